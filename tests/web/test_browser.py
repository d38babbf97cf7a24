"""The page in a real browser (headless Chromium through Playwright, the system's browser) on real
processes: ``stylequeue api`` and ``stylequeue worker --cpu`` with random weights and tiny jobs.

One tenant signs in, uploads (chosen and dropped files), submits a 2 x 2 batch, watches a job's
thumbnail change while the worker runs it, follows a job's loss curve, cancels one job, opens the
gallery, downloads the zip and signs out; a second tenant then sees none of it. Skipped where
Playwright or Chromium is missing, failed instead under CI=true (``tests.support.servers.require``).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import require
from tests.support.stacks import Stack, make_key, stack_env, stack_settings
from tests.web import browser as web_browser

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 2 scales (16 and 32 px), a checkpoint every 5 iterations: a few seconds per job on the CPU
PARAMS = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 60}

if web_browser.missing() is None:
    from playwright.sync_api import Browser, Page, expect


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    reason = web_browser.missing()
    require(reason is None, reason or "")
    with web_browser.chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("web-stack")
    env = stack_env(tmp, checkpoint_every=5, events_poll_s=0.25)
    stack = Stack("web", env, stack_settings(env), tmp)
    try:
        stack.start_worker()
        stack.start_api()
        stack.key = make_key(stack.settings)
        yield stack
    finally:
        stack.close()


def new_page(browser: Browser) -> Page:
    page = browser.new_context(viewport=web_browser.VIEWPORT, accept_downloads=True).new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.script_errors = errors  # type: ignore[attr-defined]
    return page


def watch_thumbnail_change(page: Page, card: str) -> None:
    """The card's preview shows one checkpoint, then a newer one, while its job runs."""
    first = page.wait_for_function(
        "sel => { const i = document.querySelector(sel + ' img.preview');"
        " return i && i.getAttribute('src'); }",
        arg=card,
    ).json_value()
    page.wait_for_function(
        "([sel, first]) => { const c = document.querySelector(sel); const i = c.querySelector('img.preview');"
        " return i.getAttribute('src') !== first && i.complete && i.naturalWidth > 0; }",
        arg=[card, first],
    )
    assert "/checkpoints/" in first and first.endswith("/thumb")  # the small thumbnail, set live


def follow_loss_curve(browser: Browser, base: str, page: Page, job_id: str) -> None:
    """The job's page draws its loss curve from the progress it sees (another tab of the same browser)."""
    tab = page.context.new_page()
    tab.goto(f"{base}/web/jobs/{job_id}")
    tab.wait_for_function(
        "() => { const l = document.querySelector('#loss svg polyline'); "
        "return l && l.getAttribute('points').split(' ').length >= 3; }"
    )
    expect(tab.locator("#timeline img").first).to_be_visible()
    tab.close()


def look_at_a_finished_job(page: Page, base: str, job_id: str) -> None:
    """Its result, how it ran, and a checkpoint of its timeline seen large."""
    page.goto(f"{base}/web/jobs/{job_id}")
    expect(page.locator("#job .state")).to_have_text("succeeded")
    expect(page.get_by_role("img", name="result", exact=True)).to_be_visible()
    expect(page.locator("dl.details").first).to_contain_text("random: not a real stylisation")
    page.locator("#timeline img").first.click()
    expect(page.locator("#zoom-dialog")).to_be_visible()
    page.wait_for_function("() => document.querySelector('#zoom-dialog img').naturalWidth > 0")
    page.get_by_role("button", name="Close").click()
    expect(page.locator("#zoom-dialog")).to_be_hidden()
    page.get_by_role("link", name=re.compile("^[0-9a-f]{8}$")).click()  # back to its batch


def test_a_batch_from_sign_in_to_download(chromium: Browser, stack: Stack, tmp_path: Path) -> None:
    base, images = stack.api_url, web_browser.square_images(tmp_path / "in")
    page = new_page(chromium)
    web_browser.sign_in(page, base, stack.key)
    cookie = next(c for c in page.context.cookies() if c["name"] == "sq_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/web"
    expect(page.get_by_text("No batches yet")).to_be_visible()

    contents = [images[n] for n in web_browser.CONTENTS]
    styles = [images[n] for n in web_browser.STYLES]
    web_browser.fill_submit_form(page, base, contents, styles, PARAMS)
    batch_id = web_browser.submit(page)
    cards = page.locator("li.card")
    expect(cards).to_have_count(4)
    job_ids = [cards.nth(i).get_attribute("data-job") or "" for i in range(4)]

    watch_thumbnail_change(page, f'li.card[data-job="{job_ids[0]}"]')
    follow_loss_curve(chromium, base, page, job_ids[1])
    page.get_by_role("button", name="cancel job 4").click()  # queued behind the others: at once
    expect(page.get_by_role("status")).to_have_text(re.compile("The job was (canceled|asked to stop)"))
    expect(page.locator("#batch")).to_have_attribute("data-done", "true", timeout=120_000)
    expect(page.locator("#batch .counts")).to_have_text(re.compile(r"3 succeeded\s+1 canceled"))
    expect(page.locator(f'li.card[data-job="{job_ids[3]}"] .state')).to_have_text("canceled")
    look_at_a_finished_job(page, base, job_ids[0])

    page.get_by_role("link", name="Gallery").click()
    results = page.locator("table.gallery img.result")
    expect(results).to_have_count(3)
    assert all(
        (src or "").endswith("/result/thumb") for src in results.evaluate_all("l => l.map(i => i.src)")
    )
    for i in range(3):
        page.wait_for_function(
            "img => img.complete && img.naturalWidth === 32", arg=results.nth(i).element_handle()
        )
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all results (zip)").click()
    saved = tmp_path / "results.zip"
    download.value.save_as(saved)
    names = zipfile.ZipFile(saved).namelist()
    assert len(names) == 4 and names[-1] == "README.txt" and all(n.endswith(".png") for n in names[:3])

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You are signed out.")
    assert page.goto(f"{base}/web/batches/{batch_id}") is not None and "/web/login" in page.url
    assert page.script_errors == []  # type: ignore[attr-defined]
    second_tenant_sees_nothing(chromium, stack, batch_id, job_ids[0])


def second_tenant_sees_nothing(browser: Browser, stack: Stack, batch_id: str, job_id: str) -> None:
    base = stack.api_url
    page = new_page(browser)
    web_browser.sign_in(page, base, make_key(stack.settings))
    expect(page.get_by_text("No batches yet")).to_be_visible()
    for path in (f"/web/batches/{batch_id}", f"/web/jobs/{job_id}", f"/web/batches/{batch_id}/gallery"):
        answer = page.goto(base + path)
        assert answer is not None and answer.status == 404, path
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert page.request.get(f"{base}/web/batches/{batch_id}/results.zip").status == 404
    assert page.request.get(f"{base}/web/jobs/{job_id}/result").status == 404
