"""Per-tenant quotas at submission (POST /v1/jobs and /v1/batches, SQLite and PostgreSQL): queued
jobs, the daily compute budget, refusals that create nothing, concurrency on PostgreSQL; and the
audit line of a submission."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from shared import quotas
from shared.db import get_sessionmaker, session_scope
from shared.errors import TooManyRequests
from shared.jobstore import JobSpec, insert_queued
from shared.models import Job, StoredImage, Tenant, TenantUsage
from shared.params import JobParams
from shared.settings import Settings
from shared.tenants import get_or_create_tenant
from tests.support.apps import Api, build_api, upload
from tests.support.images import image_bytes

P3 = {"size": 256, "scales": [256], "iterations": 40}  # 256 * 256 * 40 = 2,621,440: 3 MPI a job
COST = JobParams.model_validate(P3).work()

MakeApi = Callable[..., Api]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_api(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> MakeApi:
    """``make_api(**settings)``: the app on SQLite, then on PostgreSQL."""
    pg_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None

    def make(**settings: Any) -> Api:
        return build_api(settings_factory(database_url=pg_url, **settings))

    return make


def _images(api: Api) -> tuple[str, str]:
    return upload(api.client, image_bytes()).json()["id"], upload(api.client, image_bytes()).json()["id"]


def _batch(client: Any, ids: tuple[str, str], jobs: int) -> Any:
    return client.post("/v1/batches", json={"contents": [ids[0]] * jobs, "styles": [ids[1]], "params": P3})


def _job(client: Any, ids: tuple[str, str], **headers: str) -> Any:
    data = {
        "content_id": ids[0],
        "style_id": ids[1],
        "params": '{"size": 256, "scales": [256], "iterations": 40}',
    }
    return client.post("/v1/jobs", data=data, headers=headers)


def _usage(api: Api, tenant: str = "alice") -> int:
    with session_scope(api.settings.database_url) as session:
        t = session.scalar(select(Tenant).where(Tenant.name == tenant))
        assert t is not None
        return quotas.usage_on(session, t.id, quotas.today())


def _set(api: Api, tenant: str, **limits: str) -> None:
    with session_scope(api.settings.database_url) as session:
        quotas.set_limits(get_or_create_tenant(session, tenant), limits)


def _refused(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code
    return error


def test_queued_jobs_are_limited(make_api: MakeApi) -> None:
    api = make_api(tenant_max_queued=3)
    ids = _images(api)
    assert _batch(api.client, ids, 2).status_code == 202
    before = api.counts()
    error = _refused(_batch(api.client, ids, 2), 429, "tenant_queue_full")
    assert "2 queued jobs" in error["message"] and "limit is 3" in error["message"]
    assert (error["limit"], error["usage"], error["requested"]) == (3, 2, 2)
    assert int(_batch(api.client, ids, 2).headers["Retry-After"]) >= 1
    assert api.counts() == before
    assert _job(api.client, ids).status_code == 202  # 3 of 3
    _refused(_job(api.client, ids), 429, "tenant_queue_full")
    _refused(_batch(api.client, ids, 4), 403, "submission_exceeds_queue_limit")  # waiting cannot help
    bob = api.as_tenant("bob")
    bob_ids = (upload(bob, image_bytes()).json()["id"], upload(bob, image_bytes()).json()["id"])
    assert _batch(bob, bob_ids, 3).status_code == 202  # bob has a queue of his own


def test_only_queued_live_jobs_count(make_api: MakeApi) -> None:
    api = make_api(tenant_max_queued=3)
    ids = _images(api)
    job_ids = _batch(api.client, ids, 3).json()["job_ids"]
    _refused(_job(api.client, ids), 429, "tenant_queue_full")
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_ids[0]).values(status="running"))
        session.execute(update(Job).where(Job.id == job_ids[1]).values(deleted_at=Job.created_at))
    assert _batch(api.client, ids, 2).status_code == 202


def test_the_queue_override_applies(make_api: MakeApi) -> None:
    api = make_api(tenant_max_queued=1)
    ids = _images(api)
    _set(api, "alice", max_queued="0")  # no limit for alice
    assert _batch(api.client, ids, 5).status_code == 202
    _set(api, "alice", max_queued="6")
    _refused(_batch(api.client, ids, 2), 429, "tenant_queue_full")
    _set(api, "alice", max_queued="default")  # back to the setting: 1
    _refused(_job(api.client, ids), 429, "tenant_queue_full")


def test_the_daily_budget(make_api: MakeApi) -> None:
    api = make_api(tenant_daily_budget_mpi=10)
    ids = _images(api)
    for used in (3, 6, 9):
        assert _job(api.client, ids).status_code == 202
        assert _usage(api) == used
    before = api.counts()
    r = _job(api.client, ids)
    error = _refused(r, 429, "daily_budget_exceeded")
    assert "used 9 of your 10" in error["message"] and "needs 3" in error["message"]
    assert "midnight UTC" in error["message"]
    assert abs(int(r.headers["Retry-After"]) - quotas.seconds_to_midnight()) <= 5
    assert _batch(api.client, ids, 1).status_code == 429  # both routes
    assert api.counts() == before and _usage(api) == 9
    r = _batch(api.client, ids, 4)  # 4 x 2,621,440 = 10.5 MPI: 11, more than the whole budget
    error = _refused(r, 403, "job_exceeds_daily_budget")
    assert "Retry-After" not in r.headers and "11" in error["message"]
    assert api.counts() == before


def test_the_budget_is_per_utc_day_and_kept_when_jobs_go(make_api: MakeApi) -> None:
    api = make_api(tenant_daily_budget_mpi=6)
    ids = _images(api)
    assert _batch(api.client, ids, 2).status_code == 202  # ceil(5.24) = 6
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).values(deleted_at=Job.created_at))  # deleting refills nothing
    _refused(_job(api.client, ids), 429, "daily_budget_exceeded")
    with session_scope(api.settings.database_url) as session:  # that was yesterday
        session.execute(update(TenantUsage).values(day=quotas.today() - timedelta(days=1)))
    assert _job(api.client, ids).status_code == 202
    assert _usage(api) == 3


def test_the_budget_override_applies(make_api: MakeApi) -> None:
    api = make_api(tenant_daily_budget_mpi=2)
    ids = _images(api)
    _refused(_job(api.client, ids), 403, "job_exceeds_daily_budget")
    _set(api, "alice", daily_budget_mpi="0")  # no limit: still charged
    assert _batch(api.client, ids, 3).status_code == 202
    assert _usage(api) == 8  # ceil(7.86)
    _set(api, "alice", daily_budget_mpi="9")
    _refused(_job(api.client, ids), 429, "daily_budget_exceeded")


def test_a_refused_upload_stores_nothing(make_api: MakeApi) -> None:
    api = make_api(tenant_max_queued=1)
    ids = _images(api)
    assert _job(api.client, ids).status_code == 202
    before = api.counts()
    files = [
        ("content", ("c.png", image_bytes(w=80), "image/png")),
        ("style", ("s.png", image_bytes(w=90), "image/png")),
    ]
    r = api.client.post("/v1/jobs", files=files, data={"params": json.dumps(P3)})
    _refused(r, 429, "tenant_queue_full")
    assert api.counts() == before  # no image row, no ownership, no object


def test_a_replay_is_not_charged_again(make_api: MakeApi) -> None:
    api = make_api()
    ids = _images(api)
    first = _job(api.client, ids, **{"Idempotency-Key": "k1"})
    again = _job(api.client, ids, **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert _usage(api) == 3


def test_a_submission_is_audited_with_its_key(make_api: MakeApi, caplog: pytest.LogCaptureFixture) -> None:
    api = make_api()
    ids = _images(api)
    with caplog.at_level(logging.INFO, logger="shared.audit"):
        batch = _batch(api.client, ids, 2).json()
        _refused(_batch(api.client, ids, 5000), 422, "batch_too_large")
    audited = [r.getMessage() for r in caplog.records if r.name == "shared.audit"]
    lines = [line for line in audited if "action=submit" in line]  # (the uploads are audited too)
    assert len(lines) == 1, audited  # the refused one is not audited
    assert "action=submit tenant_id=" in lines[0] and f"key={api.key[:10]}" in lines[0]
    assert f"jobs=2 batch_id={batch['id']}" in lines[0] and f"job_id={batch['job_ids'][0]}" in lines[0]


# --- concurrency on PostgreSQL: admit() directly, from threads with sessions of their own ---


def _tenant_and_image(url: str) -> tuple[str, str]:
    with session_scope(url) as session:
        tenant = get_or_create_tenant(session, "racer")
        image = StoredImage(id="0" * 64, format="PNG", width=64, height=48, bytes=1, storage_key="images/x")
        session.merge(image)
        return tenant.id, image.id


def _race(url: str, threads: int, attempt: Callable[[Any], None]) -> tuple[int, int]:
    """Run ``attempt(session)`` from ``threads`` threads at once, each committing; (admitted, refused)."""
    barrier = threading.Barrier(threads)
    results: list[str] = []
    factory = get_sessionmaker(url)

    def run() -> None:
        with factory() as session:
            barrier.wait(timeout=30)
            try:
                attempt(session)
                session.commit()
                results.append("ok")
            except TooManyRequests:
                session.rollback()
                results.append("refused")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert len(results) == threads, "a thread failed or hung"
    return results.count("ok"), results.count("refused")


def test_concurrent_submissions_cannot_overspend_the_budget(
    settings_factory: Callable[..., Settings], pg_url: str
) -> None:
    settings = build_api(settings_factory(database_url=pg_url, tenant_daily_budget_mpi=15)).settings
    tenant_id, _ = _tenant_and_image(pg_url)
    ok, refused = _race(pg_url, 12, lambda s: quotas.admit(s, tenant_id, [COST], settings))
    assert (ok, refused) == (5, 7)  # 5 x 3 MPI = 15
    with session_scope(pg_url) as session:
        assert quotas.usage_on(session, tenant_id, quotas.today()) == 15


def test_concurrent_submissions_cannot_overfill_the_queue(
    settings_factory: Callable[..., Settings], pg_url: str
) -> None:
    settings = build_api(settings_factory(database_url=pg_url, tenant_max_queued=4)).settings
    tenant_id, image_id = _tenant_and_image(pg_url)

    def submit(session: Any) -> None:  # what insert_jobs does: admit, then insert the rows
        quotas.admit(session, tenant_id, [COST, COST], settings)
        spec = JobSpec(image_id, (image_id,))
        insert_queued(
            session, tenant_id=tenant_id, batch_id=None, specs=[spec, spec], params={}, max_attempts=1
        )

    assert _race(pg_url, 8, submit) == (2, 6)
    with session_scope(pg_url) as session:
        assert quotas.queued_count(session, tenant_id) == 4
