"""``make screenshots``: a picture of each page of the web page for the README (``docs/screenshots``).

Brings up a stack of real processes in a temporary folder (``stylequeue api`` and ``stylequeue worker
--cpu`` with random weights: the results are not real stylisations), signs in with a new key,
submits a 2 x 2 batch of the example images from the submit page and saves, at 1280 x 800: the
sign-in page, the filled submit form and its estimate, the batch while it runs, a job's page with its
loss curve, the gallery and the batch list. Needs Playwright and the system's Chromium
(``tests/web/browser.py``).

    python -m tests.web.screenshots [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support import REPO
from tests.support.stacks import Stack, make_key, stack_env, stack_settings
from tests.web import browser as web_browser

if TYPE_CHECKING:
    from playwright.sync_api import Page

PARAMS = {"size": 64, "min_size": 32, "scale_factor": 2, "iterations": 40}


def shoot(page: Page, out: Path, name: str) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path))
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print(f"wrote {shown} ({path.stat().st_size:,} bytes)")


def take(stack: Stack, key: str, out: Path, tmp: Path) -> None:
    from playwright.sync_api import expect

    images = web_browser.square_images(tmp / "images", size=128)
    base = stack.api_url
    with web_browser.chromium() as browser:
        page = browser.new_context(viewport=web_browser.VIEWPORT).new_page()
        page.set_default_timeout(120_000)
        page.goto(f"{base}/web/login")
        shoot(page, out, "login")
        web_browser.sign_in(page, base, key)
        contents = [images[n] for n in web_browser.CONTENTS]
        styles = [images[n] for n in web_browser.STYLES]
        web_browser.fill_submit_form(page, base, contents, styles, PARAMS)
        shoot(page, out, "submit")
        page.locator("#estimate").evaluate("e => e.scrollIntoView({block: 'center'})")
        shoot(page, out, "submit-estimate")
        web_browser.submit(page)
        cards = page.locator("li.card")
        second = cards.nth(1).get_attribute("data-job")
        page.wait_for_function(
            "() => document.querySelectorAll('li.card img.preview:not([hidden])').length >= 1"
        )
        page.wait_for_function("() => document.querySelector('li.card.running')")
        shoot(page, out, "batch")
        job = page.context.new_page()
        job.goto(f"{base}/web/jobs/{second}")
        job.wait_for_function(
            "() => { const l = document.querySelectorAll('#loss svg polyline'); "
            "return l.length >= 2 && l[1].getAttribute('points').split(' ').length >= 5; }"
        )
        shoot(job, out, "job")
        expect(page.locator("#batch")).to_have_attribute("data-done", "true", timeout=180_000)
        job.reload()
        page.get_by_role("link", name="Gallery").click()
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        shoot(page, out, "gallery")
        page.goto(f"{base}/web/batches")
        shoot(page, out, "batches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args(argv)
    reason = web_browser.missing()
    if reason is not None:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sq-screenshots-") as folder:
        tmp = Path(folder)
        env = stack_env(tmp, checkpoint_every=5, events_poll_s=0.25)
        stack = Stack("screenshots", env, stack_settings(env), tmp)
        try:
            stack.start_worker()
            stack.start_api()
            take(stack, make_key(stack.settings), args.out, tmp)
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
