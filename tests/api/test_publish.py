"""Commit before publish, publish failures, a shallow broker, and real messages in the real Redis queue."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence

import redis
from sqlalchemy import select

from api.publisher import CeleryPublisher
from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from tests.support.apps import FakePublisher, build_api, submit, upload
from tests.support.images import image_bytes
from tests.support.servers import free_port


def test_jobs_are_committed_before_publishing(settings_factory: Callable[..., Settings], pg_url: str) -> None:
    settings = settings_factory(database_url=pg_url)
    seen: list[str] = []

    def assert_visible(job_ids: Sequence[str]) -> None:
        with get_sessionmaker(settings.database_url)() as fresh:  # a NEW session
            rows = fresh.scalars(select(Job).where(Job.id.in_(job_ids))).all()
            assert len(rows) == len(job_ids)
            # committed and visible to others; published_at is the dispatcher's claim
            assert all(r.status == "queued" and r.published_at is not None for r in rows)
        seen.extend(job_ids)

    api = build_api(settings, FakePublisher(on_publish=assert_visible))
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert r.status_code == 202
    c = upload(api.client, image_bytes()).json()["id"]
    b = api.client.post("/v1/batches", json={"contents": [c] * 3, "styles": [c]})
    assert b.status_code == 202
    assert seen == [r.json()["id"], *b.json()["job_ids"]]
    with get_sessionmaker(settings.database_url)() as session:
        assert all(j.published_at is not None for j in session.scalars(select(Job)))


def test_publish_failure_still_answers_202_and_leaves_published_at_null(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    api = build_api(settings, CeleryPublisher(settings))  # the real publisher, broker down
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert r.status_code == 202, r.text
    c = upload(api.client, image_bytes()).json()["id"]
    b = api.client.post("/v1/batches", json={"contents": [c] * 2, "styles": [c]})
    assert b.status_code == 202
    with get_sessionmaker(settings.database_url)() as session:
        jobs = session.scalars(select(Job)).all()
    assert len(jobs) == 3
    assert all(j.status == "queued" and j.published_at is None for j in jobs)


def test_messages_land_in_the_redis_queue(
    settings_factory: Callable[..., Settings],
    redis_url: str,
    pg_url: str,
) -> None:
    settings = settings_factory(database_url=pg_url, broker_url=redis_url)
    api = build_api(settings, CeleryPublisher(settings))
    job = submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()
    c = upload(api.client, image_bytes()).json()["id"]
    batch = api.client.post("/v1/batches", json={"contents": [c] * 5, "styles": [c]}).json()
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(settings.queue_name, 0, -1)
    client.close()
    messages = [json.loads(m) for m in raw]
    task_ids = {m["headers"]["id"] for m in messages}
    assert task_ids == {job["id"], *batch["job_ids"]}
    assert all(m["headers"]["task"] == "stylequeue.run_job" for m in messages)
    args = [json.loads(base64.b64decode(m["body"]))[0] for m in messages]
    assert sorted(a[0] for a in args) == sorted(task_ids)  # args = [job_id]
    assert api.client.get("/readyz").status_code == 200


def test_the_broker_holds_only_what_the_free_slots_take(settings_factory: Callable[..., Settings]) -> None:
    """A batch of 6 with 2 free worker slots: 2 messages; the rest wait in the table."""
    settings = settings_factory()
    api = build_api(settings, worker_slots=2)
    c = upload(api.client, image_bytes()).json()["id"]
    b = api.client.post("/v1/batches", json={"contents": [c] * 6, "styles": [c]})
    assert b.status_code == 202
    assert api.publisher.published == b.json()["job_ids"][:2]


def test_without_a_healthy_worker_nothing_is_published(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    api = build_api(settings, worker_slots=0)
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()])
    assert r.status_code == 202 and api.publisher.published == []
    assert r.json()["status"] == "queued"


def test_priority_orders_a_tenants_line(settings_factory: Callable[..., Settings]) -> None:
    """``priority`` (form field or JSON) puts a job ahead of its tenant's earlier ones; bad values are
    refused with a clear code and create nothing."""
    settings = settings_factory()
    api = build_api(settings, worker_slots=0)  # nothing is published: the jobs wait in line
    c = upload(api.client, image_bytes()).json()["id"]
    first = api.client.post("/v1/batches", json={"contents": [c] * 2, "styles": [c]}).json()["job_ids"]
    urgent = submit(api.client, content=image_bytes(), styles=[image_bytes()], data={"priority": "7"})
    assert urgent.status_code == 202 and urgent.json()["priority"] == 7
    later = api.client.post("/v1/batches", json={"contents": [c], "styles": [c], "priority": 3})
    assert later.status_code == 202
    positions = {
        j: api.client.get(f"/v1/jobs/{j}").json()["queue"]["position"]
        for j in [urgent.json()["id"], later.json()["job_ids"][0], *first]
    }
    assert list(positions.values()) == [0, 1, 2, 3]
    before = api.counts()
    for bad in ("101", "1.5", "x", "-0x1"):
        r = submit(api.client, content=image_bytes(), styles=[image_bytes()], data={"priority": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_priority", bad
    r = api.client.post("/v1/batches", json={"contents": [c], "styles": [c], "priority": True})
    assert r.status_code == 422
    assert api.counts() == before
