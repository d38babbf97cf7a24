"""What a first user meets in the API (issue 13): small sizes, ``Location``, list filters, checkpoints
named by step, and attempts that do not count hand-backs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select, update

from shared import jobstore
from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _set(api: Api, job_id: str, **values: object) -> None:
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _batch(api: Api, n: int, **body: Any) -> dict[str, Any]:
    c = upload(api.client, image_bytes()).json()["id"]
    r = api.client.post("/v1/batches", json={"contents": [c] * n, "styles": [c], **body})
    assert r.status_code == 202, r.text
    return dict(r.json())


# --- params: size alone -------------------------------------------------------------------------


def test_a_small_size_alone_runs_one_scale_and_an_explicit_larger_min_size_is_refused(api: Api) -> None:
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()], params={"size": 96})
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["size"], r.json()["params"]["min_size"]) == (96, 96)
    assert _batch(api, 1, params={"size": 64})["job_count"] == 1
    before = api.counts()
    bad = submit(
        api.client, content=image_bytes(), styles=[image_bytes()], params={"size": 96, "min_size": 128}
    )
    assert bad.status_code == 422
    err = bad.json()["error"]
    assert err["code"] == "invalid_parameter" and err["parameter"] == "min_size", err
    assert "min_size 128 must not exceed size 96" in err["message"]
    assert api.counts() == before


# --- Location -----------------------------------------------------------------------------------


def test_submissions_answer_the_url_of_what_they_created(api: Api) -> None:
    job = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert job.status_code == 202 and job.headers["location"] == f"/v1/jobs/{job.json()['id']}"
    assert api.client.get(job.headers["location"]).json()["id"] == job.json()["id"]
    c = upload(api.client, image_bytes()).json()["id"]
    body = {"contents": [c], "styles": [c]}
    batch = api.client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k1"})
    assert batch.status_code == 202 and batch.headers["location"] == f"/v1/batches/{batch.json()['id']}"
    assert api.client.get(batch.headers["location"]).json()["job_ids"] == batch.json()["job_ids"]
    again = api.client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == batch.headers["location"]
    refused = api.client.post("/v1/batches", json={"contents": [c], "styles": []})
    assert refused.status_code == 422 and "location" not in refused.headers


def test_location_uses_the_public_url(settings_factory: Callable[..., Settings]) -> None:
    api = build_api(settings_factory(public_url="https://sq.example.com/"))
    got = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert got.headers["location"] == f"https://sq.example.com/v1/jobs/{got.json()['id']}"
    doc = api.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/batches"):
        assert "Location" in doc[path]["post"]["responses"]["202"]["headers"]


# --- list filters -------------------------------------------------------------------------------


def _pages(api: Api, **params: Any) -> list[str]:
    """Every id a listing gives, following the cursor two at a time."""
    seen: list[str] = []
    query: dict[str, Any] = {"limit": 2, **params}
    while True:
        r = api.client.get("/v1/jobs", params=query)
        assert r.status_code == 200, r.text
        seen += [j["id"] for j in r.json()["items"]]
        if not r.json()["next_cursor"]:
            return seen
        query["cursor"] = r.json()["next_cursor"]


def test_list_filters_by_status_batch_and_created_range_across_pages(any_api: Api) -> None:
    batch = _batch(any_api, 6)
    ids = batch["job_ids"]
    lone = submit(any_api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"]
    for i, job_id in enumerate([*ids, lone]):  # one an hour, 12:00 to 18:00; odd ones succeeded
        _set(any_api, job_id, created_at=T0 + timedelta(hours=i), status="succeeded" if i % 2 else "queued")
    newest_first = list(reversed([*ids, lone]))
    assert _pages(any_api) == newest_first
    window = {"created_after": "2026-03-01T13:00:00Z", "created_before": "2026-03-01T17:00:00+00:00"}
    assert _pages(any_api, **window) == list(reversed(ids[1:5]))  # 13:00 to 16:00: after inclusive
    assert _pages(any_api, **window, status="succeeded") == [ids[3], ids[1]]
    assert _pages(any_api, batch_id=batch["id"], created_after="2026-03-01T14:30") == list(reversed(ids[3:]))
    # an offset is honoured: 15:00+02:00 is 13:00 UTC
    assert _pages(any_api, created_before="2026-03-01T15:00:00+02:00") == [ids[0]]
    assert _pages(any_api, created_after="2026-03-02") == []  # a date alone is its midnight, UTC


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"created_after": "yesterday"}, "invalid_datetime"),
        ({"created_before": "2026-13-01"}, "invalid_datetime"),
        ({"created_after": "9" * 200}, "invalid_datetime"),
        ({"created_before": "0001-01-01T00:00:00+01:00"}, "invalid_datetime"),  # before year 1 in UTC
        ({"created_after": "2026-03-02", "created_before": "2026-03-01"}, "invalid_time_range"),
        ({"status": "done"}, "invalid_status"),
    ],
)
def test_list_filters_refuse_bad_values(api: Api, params: dict[str, str], code: str) -> None:
    r = api.client.get("/v1/jobs", params=params)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    if code == "invalid_datetime":
        assert r.json()["error"]["parameter"] == next(iter(params))


# --- checkpoints by step ------------------------------------------------------------------------


def test_checkpoints_are_addressed_by_step_and_old_seq_links_still_work(api: Api) -> None:
    job_id = submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"]
    refs = []
    for seq, step in ((4, 10), (5, 20), (6, 30)):
        key = f"jobs/{job_id}/checkpoints/{step}"
        api.storage.put_bytes(f"{key}.pt", f"ckpt-{step}".encode())
        api.storage.put_bytes(f"{key}.png", image_bytes())
        refs.append({"key": f"{key}.pt", "preview_key": f"{key}.png", "scale": 0, "step": step, "seq": seq})
    _set(api, job_id, status="running", attempt=1, checkpoints=refs)
    shown = api.client.get(f"/v1/jobs/{job_id}").json()["checkpoints"]
    assert [c["url"] for c in shown] == [f"/v1/jobs/{job_id}/checkpoints/{s}" for s in (10, 20, 30)]
    assert api.client.get(f"/v1/jobs/{job_id}/checkpoints/20").content == b"ckpt-20"
    preview = api.client.get(f"/v1/jobs/{job_id}/checkpoints/30/preview")
    assert preview.headers["content-type"] == "image/png"
    assert api.client.get(f"/v1/jobs/{job_id}/checkpoints/5").content == b"ckpt-20"  # seq 5, an old link
    missing = api.client.get(f"/v1/jobs/{job_id}/checkpoints/15")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"
    assert "kept: 10, 20, 30" in missing.json()["error"]["message"]


# --- attempts -----------------------------------------------------------------------------------


def _claim(api: Api, job_id: str) -> int:
    with session_scope(api.settings.database_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        attempt = jobstore.claim(session, job, "w@test")
    assert attempt is not None
    return attempt


def _release(api: Api, job_id: str, attempt: int, *, graceful: bool) -> None:
    with session_scope(api.settings.database_url) as session:
        assert jobstore.release(session, job_id, attempt, graceful=graceful)


def _attempts(api: Api, job_id: str) -> tuple[int, int]:
    job = api.client.get(f"/v1/jobs/{job_id}").json()
    return job["attempts"], job["handed_back"]


def test_a_hand_back_is_not_shown_as_a_used_attempt(any_api: Api) -> None:
    job_id = submit(any_api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"]
    assert _attempts(any_api, job_id) == (0, 0)
    first = _claim(any_api, job_id)
    assert _attempts(any_api, job_id) == (1, 0)  # running: this attempt counts
    _release(any_api, job_id, first, graceful=True)  # a worker's shutdown
    assert _attempts(any_api, job_id) == (0, 1)
    second = _claim(any_api, job_id)
    assert (second, _attempts(any_api, job_id)) == (2, (1, 1))  # the worker's log says attempt=2
    _release(any_api, job_id, second, graceful=False)  # a lost worker: it counted
    _claim(any_api, job_id)
    assert _attempts(any_api, job_id) == (2, 1)
    listed = any_api.client.get("/v1/jobs").json()["items"][0]
    assert (listed["attempts"], listed["handed_back"]) == (2, 1)
