"""``GET /v1/status``, the ``workers`` field of ``/readyz`` (with probes that name no exception), and a
queued job's ``queue`` (position in its tenant's line, ETA), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update

from api.routes import health
from shared import workers
from shared.db import session_scope
from shared.jobs import JobStatus
from shared.models import Job, Tenant, Worker, utcnow
from shared.settings import Settings
from shared.workers import WorkerStatus
from tests.support.apps import Api, FakePublisher, build_api, upload
from tests.support.images import image_bytes

REMEDY = "cannot load the VGG19 weights '/w/missing.pth': run `stylequeue weights fetch`"


def add_worker(api: Api, node: str, status: WorkerStatus, **fields: Any) -> None:
    with session_scope(api.settings.database_url) as s:
        workers.register(
            s,
            node=node,
            host=node.split("@")[-1],
            device=fields.pop("device", "cuda:0"),
            weights=fields.pop("weights", "/w/missing.pth"),
            capabilities={},
            slots=fields.pop("slots", 1),
            status=status,
            **fields,
        )


def tenant_id(api: Api, name: str = "alice") -> str:
    with session_scope(api.settings.database_url) as s:
        found = s.scalar(select(Tenant.id).where(Tenant.name == name))
        assert found is not None
        return found


def set_job(api: Api, job_id: str, **values: Any) -> None:
    with session_scope(api.settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def jobs_of(api: Api, client: Any, count: int) -> list[str]:
    """``count`` queued jobs of the client's tenant, in submission order (one batch)."""
    content = upload(client, image_bytes()).json()["id"]
    styles = [upload(client, image_bytes()).json()["id"] for _ in range(count)]
    r = client.post("/v1/batches", json={"contents": [content], "styles": styles})
    assert r.status_code == 202, r.text
    ids: list[str] = r.json()["job_ids"]
    return ids


def test_readyz_counts_workers_but_does_not_need_them(any_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "READY_CACHE_S", 0.0)  # every call probes
    body = any_api.client.get("/readyz").json()
    assert body["status"] == "ready" and body["workers"] == {"healthy": 1, "unhealthy": 0}
    add_worker(any_api, "gpu0@box", WorkerStatus.UNHEALTHY, detail=REMEDY)
    add_worker(any_api, "gpu1@box", WorkerStatus.STARTING)
    assert any_api.client.get("/readyz").json()["workers"] == {"healthy": 1, "unhealthy": 1}
    with session_scope(any_api.settings.database_url) as s:
        s.execute(delete(Worker).where(Worker.id == "test-worker@test"))
    r = any_api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["workers"] == {"healthy": 0, "unhealthy": 1}


def test_readyz_probes_say_down_without_the_exception(settings_factory: Callable[..., Settings]) -> None:
    api = build_api(settings_factory(), FakePublisher(down=True))  # its check raises ConnectionError
    r = api.client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": "ok", "broker": "down", "storage": "ok"}
    assert "ConnectionError" not in r.text and "broker down" not in r.text
    assert r.json()["workers"] == {"healthy": 1, "unhealthy": 0}


def test_a_flood_of_readyz_probes_the_dependencies_once(api: Api) -> None:
    """Unauthenticated and cheap to send: 40 at once cost one probe of each dependency, answered
    while later callers wait on the event loop (no thread each), and the answer is the same."""
    calls: list[float] = []
    api.publisher.check = lambda: calls.append(time.monotonic())

    async def flood() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return list(await asyncio.gather(*(client.get("/readyz") for _ in range(40))))

    answers = asyncio.run(flood())
    assert {r.status_code for r in answers} == {200} and len(calls) == 1
    assert all(r.json() == answers[0].json() for r in answers)
    assert [api.client.get("/readyz").status_code for _ in range(3)] == [200] * 3
    assert len(calls) == 1  # within the second, from any event loop: the same answer
    app: Any = api.client.app
    app.state.ready_cache.at -= health.READY_CACHE_S  # a second later: probed again
    assert api.client.get("/readyz").status_code == 200 and len(calls) == 2


def test_status_needs_a_key(api: Api) -> None:
    from fastapi.testclient import TestClient

    assert TestClient(api.client.app).get("/v1/status").status_code == 401


def test_status_shows_workers_jobs_and_throughput(any_api: Api) -> None:
    now = utcnow()
    add_worker(any_api, "gpu0@secret-host", WorkerStatus.UNHEALTHY, detail=REMEDY)
    add_worker(any_api, "gpu1@other", WorkerStatus.HEALTHY, slots=3, now=now - timedelta(minutes=5))  # lost
    mine = jobs_of(any_api, any_api.client, 4)
    theirs = jobs_of(any_api, any_api.as_tenant("bob"), 3)
    set_job(any_api, mine[0], status=JobStatus.RUNNING, started_at=now)
    set_job(any_api, theirs[0], status=JobStatus.RUNNING, started_at=now)
    set_job(any_api, theirs[1], deleted_at=now)  # deleted: not queued any more
    for job_id, minutes in ((mine[1], 2), (theirs[2], 9), (mine[2], 11)):
        ended = now - timedelta(minutes=minutes)
        set_job(any_api, job_id, status=JobStatus.SUCCEEDED, started_at=ended, finished_at=ended)
    r = any_api.client.get("/v1/status")
    assert r.status_code == 200, r.text
    body = r.json()
    w = body["workers"]
    assert (w["healthy"], w["unhealthy"], w["lost"], w["slots"]) == (1, 1, 1, 1000)
    assert w["unhealthy_workers"] == [
        {
            "status": "unhealthy",
            "device": "cuda:0",
            "weights": "/w/missing.pth",
            "detail": REMEDY,
            "heartbeat_age_s": w["unhealthy_workers"][0]["heartbeat_age_s"],
        }
    ]
    assert "secret-host" not in r.text
    assert body["jobs"] == {"running": 2, "queued": 1}
    assert body["tenant"] == {"running": 1, "queued": 1}
    assert body["throughput"] == {"window_s": 600, "finished": 2, "per_minute": 0.2}
    assert any_api.as_tenant("bob").get("/v1/status").json()["tenant"] == {"running": 1, "queued": 0}


def test_queued_jobs_show_their_position_and_eta(any_api: Api) -> None:
    ids = jobs_of(any_api, any_api.client, 4)
    jobs_of(any_api, any_api.as_tenant("bob"), 2)  # another line: no effect on positions
    set_job(any_api, ids[3], priority=10)  # submitted last, dispatched first
    queue = {j: any_api.client.get(f"/v1/jobs/{j}").json()["queue"] for j in ids}
    assert [queue[j]["position"] for j in ids] == [1, 2, 3, 0]
    assert all(q["eta_seconds"] is None for q in queue.values())  # nothing finished yet
    set_job(any_api, ids[0], status=JobStatus.RUNNING, started_at=utcnow())
    now = utcnow()
    with session_scope(any_api.settings.database_url) as s:
        for _ in range(9):  # 9 jobs in the last 15 minutes: one every 100 s, shared by 2 tenants
            s.add(
                Job(
                    tenant_id=tenant_id(any_api, "bob"),
                    content_image_id=s.scalar(select(Job.content_image_id).limit(1)),
                    style_image_ids=[],
                    status=JobStatus.SUCCEEDED,
                    started_at=now - timedelta(minutes=5),
                    finished_at=now - timedelta(minutes=4),
                )
            )
    listed = {j["id"]: j for j in any_api.client.get("/v1/jobs").json()["items"]}
    assert listed[ids[0]]["status"] == "running" and listed[ids[0]]["queue"] is None
    assert {j: listed[j]["queue"]["position"] for j in ids[1:]} == {ids[3]: 0, ids[1]: 1, ids[2]: 2}
    assert listed[ids[3]]["queue"]["eta_seconds"] == 200.0
    assert listed[ids[2]]["queue"]["eta_seconds"] == 600.0
    single = any_api.client.get(f"/v1/jobs/{ids[2]}").json()["queue"]
    assert single == listed[ids[2]]["queue"]
    set_job(any_api, ids[1], status=JobStatus.CANCELED, finished_at=utcnow())
    assert any_api.client.get(f"/v1/jobs/{ids[1]}").json()["queue"] is None
    assert any_api.client.get(f"/v1/jobs/{ids[2]}").json()["queue"]["position"] == 1
