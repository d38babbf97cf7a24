"""The reconciler on real databases: lost messages re-published, dead workers' jobs requeued or failed."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import JobStatus
from shared.models import Job, StoredImage, utcnow
from shared.reconcile import reconcile_once


@pytest.fixture
def sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """The folder's empty database, plus one stored image for the jobs to name."""
    with sessions() as s:
        s.add(
            StoredImage(
                id="a" * 64, format="PNG", width=32, height=32, bytes=10, storage_key="images/" + "a" * 64
            )
        )
        s.commit()
    return sessions


def add_job(sessions: sessionmaker[Session], **fields: Any) -> str:
    job = Job(tenant_id="t1", content_image_id="a" * 64, style_image_ids=["a" * 64], **fields)
    with sessions() as s:
        s.add(job)
        s.commit()
        return job.id


def status_of(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_lost_and_unpublished_messages_are_republished(sessions: sessionmaker[Session]) -> None:
    old = utcnow() - timedelta(hours=1)
    never = add_job(sessions, published_at=None, updated_at=old)  # API died before publishing
    publishing = add_job(sessions, published_at=None)  # the API is publishing it right now
    lost = add_job(sessions, published_at=old)
    fresh = add_job(sessions, published_at=utcnow())
    done = add_job(sessions, status=JobStatus.SUCCEEDED.value, published_at=old)
    published: list[str] = []
    report = reconcile_once(sessions, published.append, requeue_after_s=60, lease_s=60)
    assert sorted(published) == sorted([never, lost]) == sorted(report.republished)
    assert fresh not in published and done not in published and publishing not in published
    # A second pass right away publishes nothing: published_at was moved forward.
    again: list[str] = []
    reconcile_once(sessions, again.append, requeue_after_s=60, lease_s=60)
    assert again == []


def test_expired_lease_requeues_then_fails_after_max_attempts(sessions: sessionmaker[Session]) -> None:
    stale = utcnow() - timedelta(minutes=10)
    dead = add_job(sessions, status="running", attempt=1, max_attempts=3, heartbeat_at=stale)
    spent = add_job(sessions, status="running", attempt=3, max_attempts=3, heartbeat_at=stale)
    alive = add_job(sessions, status="running", attempt=1, heartbeat_at=utcnow())
    published: list[str] = []
    report = reconcile_once(sessions, published.append, requeue_after_s=600, lease_s=60)
    assert report.requeued == [dead] and published == [dead]
    assert status_of(sessions, dead).status == "queued"
    failed = status_of(sessions, spent)
    assert (failed.status, failed.error_code) == ("failed", "worker_lost")
    assert failed.finished_at is not None
    assert status_of(sessions, alive).status == "running"


def test_publish_failure_leaves_job_for_next_pass(sessions: sessionmaker[Session]) -> None:
    job_id = add_job(sessions, published_at=utcnow() - timedelta(hours=1))

    def broken(_: str) -> None:
        raise ConnectionError("broker down")

    before = status_of(sessions, job_id).published_at
    report = reconcile_once(sessions, broken, requeue_after_s=60, lease_s=60)
    assert report.republished == [] and status_of(sessions, job_id).published_at == before
    published: list[str] = []
    reconcile_once(sessions, published.append, requeue_after_s=60, lease_s=60)
    assert published == [job_id]


def test_concurrent_reconcilers_publish_each_job_once(sessions: sessionmaker[Session]) -> None:
    ids = {add_job(sessions, published_at=utcnow() - timedelta(hours=1)) for _ in range(20)}
    published: list[str] = []
    lock = threading.Lock()

    def publish(job_id: str) -> None:
        with lock:
            published.append(job_id)

    threads = [
        threading.Thread(
            target=reconcile_once, args=(sessions, publish), kwargs=dict(requeue_after_s=60, lease_s=60)
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(published) == sorted(ids)  # every job once, none twice


def test_reconcile_prunes_expired_idempotency_keys(sessions: sessionmaker[Session]) -> None:
    from shared.idempotency import RETENTION
    from shared.models import IdempotencyKey

    with sessions() as s:
        s.execute(delete(IdempotencyKey))
        s.add(
            IdempotencyKey(
                tenant_id="t1",
                key="old",
                request_hash="h",
                status_code=202,
                response={},
                created_at=utcnow() - RETENTION - timedelta(minutes=1),
            )
        )
        s.add(IdempotencyKey(tenant_id="t1", key="new", request_hash="h", status_code=202, response={}))
        s.commit()
    report = reconcile_once(sessions, lambda _: None, requeue_after_s=60, lease_s=60)
    assert report.pruned_keys == 1
    with sessions() as s:
        assert [k.key for k in s.query(IdempotencyKey).all()] == ["new"]
