"""The page's lists, grids and forms, rendered by the in-process app (no JavaScript: the server's HTML)."""

from __future__ import annotations

import json
import re

from shared.params import JobParams
from tests.support.apps import Api, upload
from tests.web.webclient import TINY, Browser, browser, finish, new_key, square


def test_the_batch_list_shows_counts_and_progress(web: Browser, api: Api) -> None:
    assert "No batches yet" in web.get("/web/batches").text
    batch = web.submit().json()
    finish(api, batch["job_ids"][0])
    page = web.get("/web/batches").text
    row = re.search(rf'<tr data-batch="{batch["id"]}">.*?</tr>', page, re.S)
    assert row, page
    assert "1 succeeded" in row.group(0) and "3 queued" in row.group(0)
    assert 'value="25"' in row.group(0)  # one of four jobs done


def test_the_batch_page_has_a_card_per_job_with_its_state(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    done = batch["job_ids"][0]
    finish(api, done)
    page = web.get(f"/web/batches/{batch['id']}").text
    cards = re.findall(r'<li class="card (\w+)" data-job="([^"]+)"', page)
    assert cards == [("succeeded", done)] + [("queued", j) for j in batch["job_ids"][1:]]
    assert f'src="/web/jobs/{done}/result"' in page  # a finished job shows its result
    assert page.count("queued: ") == 3  # in words, with the place in line
    assert f'data-batch="{batch["id"]}"' in page and 'data-done="false"' in page


def cancel_form(page: str) -> str:
    found = re.search(r'<form[^>]*id="cancel-job"[^>]*>', page)
    assert found, page
    return found.group(0)


def test_the_job_page_shows_checkpoints_result_and_how_it_ran(web: Browser, api: Api) -> None:
    job_id = web.submit(contents=1, styles=1).json()["job_ids"][0]
    page = web.get(f"/web/jobs/{job_id}").text
    assert "queued" in page and " hidden" not in cancel_form(page)
    finish(api, job_id)
    page = web.get(f"/web/jobs/{job_id}").text
    assert f'href="/web/jobs/{job_id}/checkpoints/3/preview"' in page  # by step, as the API links them
    assert f'href="/web/jobs/{job_id}/checkpoints/6/preview"' in page
    assert "scale 2 · iteration 3" in page
    assert f'src="/web/jobs/{job_id}/result"' in page and "download" in page
    assert "random: not a real stylisation" in page and "0.4 s" in page
    assert "data-points='[[1, 3, 0.5]]'" in page  # the latest loss; the script adds what it sees live
    assert " hidden" in cancel_form(page)  # nothing to cancel any more


def test_grids_timeline_and_gallery_show_thumbnails_and_link_the_full_images(web: Browser, api: Api) -> None:
    from sqlalchemy import update

    from shared.db import session_scope
    from shared.models import Job

    batch = web.submit().json()
    done, old, running = batch["job_ids"][:3]
    finish(api, done, thumbs=True)
    finish(api, old)  # finished by an earlier version: no thumbnails
    ref = {"key": "k.pt", "preview_key": "k.png", "thumb_key": "k.thumb.jpg", "scale": 0, "iteration": 2}
    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == running).values(status="running", checkpoints=[{**ref, "step": 2}])
        )
    grid = web.get(f"/web/batches/{batch['id']}").text
    assert f'src="/web/jobs/{done}/result/thumb"' in grid
    assert f'src="/web/jobs/{old}/result"' in grid  # the full result: it has no thumbnail
    assert f'src="/web/jobs/{running}/checkpoints/2/thumb"' in grid  # the newest checkpoint's
    assert "/preview" not in grid and f'src="/web/jobs/{done}/result"' not in grid
    page = web.get(f"/web/jobs/{done}").text
    for step in (3, 6):  # the timeline: a thumbnail that opens the full preview
        link = f'<a class="zoom" href="/web/jobs/{done}/checkpoints/{step}/preview">'
        assert f'{link}<img src="/web/jobs/{done}/checkpoints/{step}/thumb"' in page
    assert f'<img src="/web/jobs/{done}/result" alt="result" class="big">' in page  # large: full
    legacy = web.get(f"/web/jobs/{old}").text
    assert f'<img src="/web/jobs/{old}/checkpoints/3/preview"' in legacy and "/thumb" not in legacy
    gallery = web.get(f"/web/batches/{batch['id']}/gallery").text
    link = f'<a href="/web/jobs/{done}/result"><img class="result" src="/web/jobs/{done}/result/thumb"'
    assert link in gallery
    assert f'<a href="/web/jobs/{old}/result"><img class="result" src="/web/jobs/{old}/result"' in gallery


def test_a_failed_job_says_why_in_words(web: Browser, api: Api) -> None:
    from sqlalchemy import update

    from shared.db import session_scope
    from shared.models import Job

    batch = web.submit(contents=1, styles=1).json()
    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == batch["job_ids"][0])
            .values(
                status="failed", error_code="image_unreadable", error_message="the style could not be <read>"
            )
        )
    page = web.get(f"/web/batches/{batch['id']}").text
    assert "failed: the style could not be &lt;read&gt;" in page  # escaped, in words


def test_cancel_and_delete_from_the_page(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    first, second, third, _ = batch["job_ids"]
    answer = web.action(f"/web/jobs/{first}/cancel", back=f"/web/batches/{batch['id']}")
    assert answer.headers["location"] == f"/web/batches/{batch['id']}?notice=canceled"
    assert "The job was canceled." in web.client.get(answer.headers["location"]).text
    again = web.action(f"/web/jobs/{first}/cancel")
    assert again.headers["location"] == f"/web/jobs/{first}?notice=already_finished"
    gone = web.action(f"/web/jobs/{second}/delete")
    assert gone.headers["location"] == f"/web/batches/{batch['id']}?notice=job_deleted"
    assert web.get(f"/web/jobs/{second}").status_code == 404
    assert web.action(f"/web/batches/{batch['id']}/cancel").status_code == 303
    assert 'class="card canceled" data-job="' + third in web.get(f"/web/batches/{batch['id']}").text
    deleted = web.action(f"/web/batches/{batch['id']}/delete")
    assert deleted.headers["location"] == "/web/batches?notice=batch_deleted"
    assert web.get(f"/web/batches/{batch['id']}").status_code == 404


def test_another_tenant_sees_none_of_it(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    job_id = batch["job_ids"][0]
    finish(api, job_id, thumbs=True)
    image_id = re.search(r'src="/web/images/([0-9a-f]{64})"', web.get(f"/web/jobs/{job_id}").text)
    assert image_id
    bob = browser(api)
    bob.sign_in(new_key(api, "bob"))
    assert batch["id"][:8] not in bob.get("/web/batches").text
    for path in (
        f"/web/batches/{batch['id']}",
        f"/web/batches/{batch['id']}/gallery",
        f"/web/jobs/{job_id}",
        f"/web/batches/{batch['id']}/results.zip",
        f"/web/batches/{batch['id']}/events",
        f"/web/jobs/{job_id}/events",
        f"/web/jobs/{job_id}/result",
        f"/web/jobs/{job_id}/checkpoints/3/preview",
        f"/web/jobs/{job_id}/checkpoints/3/thumb",
        f"/web/jobs/{job_id}/result/thumb",
        f"/web/images/{image_id.group(1)}",
    ):
        assert bob.get(path).status_code == 404, path
    for path in (
        f"/web/jobs/{job_id}/cancel",
        f"/web/jobs/{job_id}/delete",
        f"/web/batches/{batch['id']}/delete",
    ):
        assert bob.action(path).status_code == 404, path
    assert web.get(f"/web/jobs/{job_id}").status_code == 200  # still there for its owner


def test_the_submit_form_shows_the_parameters_defaults_and_limits(web: Browser, api: Api) -> None:
    upload(api.client, square(7))
    page = web.get("/web/submit").text
    defaults = JobParams()
    assert f'placeholder="{defaults.size}"' in page and 'max="2048"' in page  # size: the server's max_size
    assert f"default {defaults.scale_factor:.4g}" in page and "default lbfgs" in page
    assert "at most 5000 over all scales" in page
    assert re.search(r'data-idempotency-key="[0-9a-f-]{36}"', page)
    assert re.search(r'name="content_id" value="[0-9a-f]{64}"', page)  # the upload, to pick
    for role in ("content", "style"):
        assert f'<label for="{role}-files"' in page and f'id="{role}-files"' in page


def test_the_estimate_is_what_the_submission_would_check(web: Browser) -> None:
    params = {"size": 64, "min_size": 16, "scale_factor": 2, "iterations": 10}
    answer = web.get("/web/estimate", params={"contents": 3, "styles": 2, "params": json.dumps(params)})
    assert answer.status_code == 200, answer.text
    expected = JobParams(**params)
    assert answer.json() == {
        "jobs": 6,
        "scales": [16, 32, 64],
        "iterations": [10, 10, 10],
        "work_per_job": expected.work(),
        "max_job_work": 2_000_000_000,
        "charge_mpi": 1,
        "budget_mpi": 1_000_000,
        "used_mpi": 0,
    }
    pairs = web.get(
        "/web/estimate", params={"contents": 2, "styles": 2, "mode": "pairs", "pairs": "[[0, 1]]"}
    )
    assert pairs.json()["jobs"] == 1
    too_big = web.get(
        "/web/estimate", params={"contents": 1, "styles": 1, "params": json.dumps({**TINY, "size": 9999})}
    )
    assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "size_too_large"
    none = web.get("/web/estimate", params={"contents": 0, "styles": 1})
    assert none.json()["error"]["message"] == "send at least one content image"
    assert browser(web.api).get("/web/estimate").status_code == 401


def test_the_static_files_are_served(web: Browser) -> None:
    for name in ("style.css", "common.js", "batch.js", "job.js", "submit.js"):
        assert web.get(f"/web/static/{name}").status_code == 200, name
    assert web.get("/web").headers["location"] == "/web/batches"
