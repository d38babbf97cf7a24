"""DELETE /v1/jobs/{id}, DELETE /v1/batches/{id}, POST /v1/batches/{id}/cancel: hidden at once,
files deleted once no worker can write them, set-based for a whole batch, per tenant."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import event, select, update

from shared import jobstore
from shared.db import get_engine, get_sessionmaker, session_scope
from shared.models import Batch, Job, StoredImage, utcnow
from shared.purge import purge_once
from tests.support.apps import Api, submit, upload
from tests.support.images import image_bytes


def _set(api: Api, job_id: str, **values: object) -> None:
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _row(api: Api, job_id: str) -> Job | None:
    with session_scope(api.settings.database_url) as session:
        return session.get(Job, job_id)


def _files(api: Api, job_id: str, *, attempt: int = 2) -> list[str]:
    """Objects as a worker leaves them: a checkpoint, its preview and thumbnail, each attempt's result
    and its thumbnail (an earlier attempt's too)."""
    keys = [f"jobs/{job_id}/checkpoints/3.{ext}" for ext in ("pt", "png", "thumb.jpg")]
    keys += [
        f"jobs/{job_id}/result.a{a}.{ext}" for a in range(1, attempt + 1) for ext in ("png", "thumb.jpg")
    ]
    for key in keys:
        api.storage.put_bytes(key, b"bytes of " + key.encode())
    return keys


def _checkpoints(job_id: str) -> list[dict[str, Any]]:
    key = f"jobs/{job_id}/checkpoints/3"
    return [
        {
            "key": f"{key}.pt",
            "preview_key": f"{key}.png",
            "thumb_key": f"{key}.thumb.jpg",
            "scale": 0,
            "iteration": 9,
            "step": 3,
            "seq": 0,
        }
    ]


def _finish(api: Api, job_id: str) -> list[str]:
    keys = _files(api, job_id)
    _set(
        api,
        job_id,
        status="succeeded",
        attempt=2,
        result_key=f"jobs/{job_id}/result.a2.png",
        checkpoints=_checkpoints(job_id),
        execution={"result_thumb_key": f"jobs/{job_id}/result.a2.thumb.jpg"},
        finished_at=utcnow(),
    )
    return keys


def _run(api: Api, job_id: str) -> list[str]:
    keys = _files(api, job_id, attempt=1)[:3]  # the checkpoint's objects: no result yet
    _set(api, job_id, status="running", attempt=1, heartbeat_at=utcnow(), checkpoints=_checkpoints(job_id))
    return keys


def _stored(api: Api) -> set[str]:
    return set(api.storage.list_keys())


def _job(api: Api) -> dict[str, Any]:
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def _gone_for_the_tenant(api: Api, job_id: str) -> None:
    for path in (
        "",
        "/result",
        "/result/thumb",
        "/checkpoints/0",
        "/checkpoints/0/preview",
        "/checkpoints/0/thumb",
    ):
        r = api.client.get(f"/v1/jobs/{job_id}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (path, r.text)
    assert job_id not in {j["id"] for j in api.client.get("/v1/jobs").json()["items"]}
    assert api.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert api.client.delete(f"/v1/jobs/{job_id}").status_code == 404  # deleting again: not found


def test_delete_a_finished_job_deletes_its_files_at_once(any_api: Api) -> None:
    job, other = _job(any_api), _job(any_api)
    keys, kept = _finish(any_api, job["id"]), _finish(any_api, other["id"])
    assert any_api.client.get(f"/v1/jobs/{job['id']}/result").status_code == 200
    r = any_api.client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 204 and r.content == b""
    _gone_for_the_tenant(any_api, job["id"])
    stored = _stored(any_api)
    assert not stored & set(keys) and set(kept) <= stored
    assert any_api.client.get(f"/v1/jobs/{other['id']}/result").status_code == 200
    row = _row(any_api, job["id"])  # hidden and emptied; the row itself goes after the grace
    assert row is not None and row.deleted_at is not None and row.result_key is None and row.checkpoints == []
    assert f"images/{job['content_id']}" in stored  # a hidden row still names its images


def test_delete_a_queued_job_cancels_it(any_api: Api) -> None:
    job = _job(any_api)
    r = any_api.client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 204
    _gone_for_the_tenant(any_api, job["id"])
    row = _row(any_api, job["id"])
    assert row is not None and row.status == "canceled" and row.finished_at is not None


def test_delete_a_running_job_waits_for_its_worker(any_api: Api) -> None:
    job = _job(any_api)
    keys = _run(any_api, job["id"])
    r = any_api.client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 202, r.text
    assert r.json()["id"] == job["id"] and r.json()["status"] == "deleting" and r.json()["running"] == 1
    _gone_for_the_tenant(any_api, job["id"])
    row = _row(any_api, job["id"])
    assert row is not None and row.status == "running" and row.cancel_requested
    assert set(keys) <= _stored(any_api)  # its worker may still write them: kept

    sessions = get_sessionmaker(any_api.settings.database_url)
    assert purge_once(sessions, any_api.storage, any_api.settings).emptied == []  # still running
    with sessions() as session:  # its worker sees the request and stops
        assert jobstore.cancel(session, job["id"], 1)
        session.commit()
    report = purge_once(sessions, any_api.storage, any_api.settings)
    assert report.emptied == [job["id"]] and not _stored(any_api) & set(keys)
    later = purge_once(sessions, any_api.storage, any_api.settings, now=utcnow() + timedelta(hours=2))
    assert later.removed_jobs == 1 and _row(any_api, job["id"]) is None
    assert set(later.removed_images) == {job["content_id"], *job["style_ids"]}  # nothing else named them
    assert not _stored(any_api)


def test_another_tenant_cannot_delete_or_cancel(any_api: Api) -> None:
    job = _job(any_api)
    c = upload(any_api.client, image_bytes()).json()["id"]
    batch = any_api.client.post("/v1/batches", json={"contents": [c], "styles": [c]}).json()
    bob = any_api.as_tenant("bob")
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.delete(f"/v1/batches/{batch['id']}").status_code == 404
    r = bob.post(f"/v1/batches/{batch['id']}/cancel")
    assert r.status_code == 404 and r.json()["error"]["code"] == "batch_not_found"
    assert any_api.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert any_api.client.get(f"/v1/batches/{batch['id']}").json()["counts"]["queued"] == 1


def test_deleted_jobs_leave_batch_views_and_counts(api: Api) -> None:
    c = upload(api.client, image_bytes()).json()["id"]
    batch = api.client.post("/v1/batches", json={"contents": [c] * 3, "styles": [c]}).json()
    gone = batch["job_ids"][1]
    assert api.client.delete(f"/v1/jobs/{gone}").status_code == 204
    got = api.client.get(f"/v1/batches/{batch['id']}").json()
    assert got["job_count"] == 2 and gone not in got["job_ids"] and got["counts"]["canceled"] == 0
    listed = api.client.get("/v1/jobs", params={"batch_id": batch["id"]}).json()["items"]
    assert {j["id"] for j in listed} == set(batch["job_ids"]) - {gone}
    assert api.client.get("/v1/jobs", params={"status": "canceled"}).json()["items"] == []


def _batch_of_three(api: Api) -> tuple[str, list[str], list[str], list[str]]:
    """A batch whose jobs are queued, running and succeeded; the files of the last two."""
    c = upload(api.client, image_bytes()).json()["id"]
    s = upload(api.client, image_bytes()).json()["id"]
    batch = api.client.post("/v1/batches", json={"contents": [c] * 3, "styles": [s]}).json()
    queued, running, done = batch["job_ids"]
    return batch["id"], batch["job_ids"], _run(api, running), _finish(api, done)


def test_delete_a_batch(any_api: Api) -> None:
    batch_id, (queued, running, done), running_keys, done_keys = _batch_of_three(any_api)
    r = any_api.client.delete(f"/v1/batches/{batch_id}")
    assert r.status_code == 202 and r.json() == {**r.json(), "id": batch_id, "running": 1}
    assert any_api.client.get(f"/v1/batches/{batch_id}").status_code == 404
    assert any_api.client.post(f"/v1/batches/{batch_id}/cancel").status_code == 404
    assert any_api.client.delete(f"/v1/batches/{batch_id}").status_code == 404
    for job_id in (queued, running, done):
        _gone_for_the_tenant(any_api, job_id)
    assert any_api.client.get("/v1/jobs", params={"batch_id": batch_id}).json()["items"] == []
    was_queued, was_running = _row(any_api, queued), _row(any_api, running)
    assert was_queued is not None and was_queued.status == "canceled"
    assert was_running is not None and was_running.status == "running" and was_running.cancel_requested
    stored = _stored(any_api)
    assert not stored & set(done_keys) and set(running_keys) <= stored

    sessions = get_sessionmaker(any_api.settings.database_url)
    with sessions() as session:
        assert jobstore.cancel(session, running, 1)
        session.commit()
    purge_once(sessions, any_api.storage, any_api.settings)
    report = purge_once(sessions, any_api.storage, any_api.settings, now=utcnow() + timedelta(hours=2))
    assert report.removed_jobs == 3 and report.removed_batches == 1 and len(report.removed_images) == 2
    with session_scope(any_api.settings.database_url) as session:
        assert session.get(Batch, batch_id) is None and session.scalars(select(StoredImage)).all() == []
    assert not _stored(any_api)


def test_delete_a_finished_batch_answers_204(api: Api) -> None:
    c = upload(api.client, image_bytes()).json()["id"]
    batch = api.client.post("/v1/batches", json={"contents": [c] * 2, "styles": [c]}).json()
    keys = [k for j in batch["job_ids"] for k in _finish(api, j)]
    assert api.client.delete(f"/v1/batches/{batch['id']}").status_code == 204
    assert not _stored(api) & set(keys)


def test_cancel_a_batch(any_api: Api) -> None:
    batch_id, (queued, running, done), _, _ = _batch_of_three(any_api)
    r = any_api.client.post(f"/v1/batches/{batch_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json() == {"canceled": 1, "cancel_requested": 1, "already_finished": 1}
    assert any_api.client.get(f"/v1/jobs/{queued}").json()["status"] == "canceled"
    got = any_api.client.get(f"/v1/jobs/{running}").json()
    assert got["status"] == "running" and got["cancel_requested"] is True
    assert any_api.client.get(f"/v1/jobs/{done}").json()["status"] == "succeeded"
    again = any_api.client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert again == {"canceled": 0, "cancel_requested": 1, "already_finished": 2}
    assert any_api.client.get(f"/v1/batches/{batch_id}").status_code == 200  # canceled, not deleted


def test_a_thousand_job_batch_is_canceled_and_deleted_in_a_few_statements(pg_api: Api) -> None:
    c = upload(pg_api.client, image_bytes()).json()["id"]
    s = [upload(pg_api.client, image_bytes()).json()["id"] for _ in range(2)]
    batch = pg_api.client.post("/v1/batches", json={"contents": [c] * 500, "styles": s}).json()
    assert batch["job_count"] == 1000
    ids = batch["job_ids"]
    with session_scope(pg_api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_(ids[:300])).values(status="running", attempt=1))
        done = update(Job).where(Job.id.in_(ids[300:600]))
        session.execute(done.values(status="succeeded", attempt=1, result_key="jobs/x/result.a1.png"))
    statements: list[str] = []
    engine = get_engine(pg_api.settings.database_url)

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        r = pg_api.client.post(f"/v1/batches/{batch['id']}/cancel")
        assert r.json() == {"canceled": 400, "cancel_requested": 300, "already_finished": 300}
        cancel_statements = len(statements)
        assert pg_api.client.delete(f"/v1/batches/{batch['id']}").status_code == 202
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert cancel_statements <= 8, statements  # the key, the batch, a count, two UPDATEs: not one per job
    assert len(statements) - cancel_statements <= 12, statements[cancel_statements:]
    with session_scope(pg_api.settings.database_url) as session:
        hidden = session.scalars(select(Job.deleted_at).where(Job.batch_id == batch["id"])).all()
        assert len(hidden) == 1000 and all(hidden)
