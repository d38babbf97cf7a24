"""The reconciler on real databases: jobs of lost messages and dead workers wait again (for the
dispatch step), or fail when their attempts are spent."""

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


def waiting(sessions: sessionmaker[Session], job_id: str) -> bool:
    job = status_of(sessions, job_id)
    return job.status == "queued" and job.published_at is None


def test_lost_messages_wait_again_after_the_grace(sessions: sessionmaker[Session]) -> None:
    """A message not started within the grace is presumed lost: the job waits again, for the
    dispatch step to publish into a free slot. Waiting jobs are never touched."""
    old = utcnow() - timedelta(seconds=31)
    never = add_job(sessions, published_at=None, updated_at=utcnow() - timedelta(hours=1))
    lost = add_job(sessions, published_at=old)
    fresh = add_job(sessions, published_at=utcnow() - timedelta(seconds=10))  # within the grace
    done = add_job(sessions, status=JobStatus.SUCCEEDED.value, published_at=old)
    report = reconcile_once(sessions, publish_grace_s=30, lease_s=60)
    assert report.lost == [lost] and waiting(sessions, lost)
    assert waiting(sessions, never)
    assert status_of(sessions, fresh).published_at is not None
    assert status_of(sessions, done).published_at is not None
    assert reconcile_once(sessions, publish_grace_s=30, lease_s=60).lost == []  # nothing twice


def test_expired_lease_requeues_then_fails_after_max_attempts(sessions: sessionmaker[Session]) -> None:
    stale = utcnow() - timedelta(minutes=10)
    dead = add_job(sessions, status="running", attempt=1, max_attempts=3, heartbeat_at=stale)
    spent = add_job(sessions, status="running", attempt=3, max_attempts=3, heartbeat_at=stale)
    alive = add_job(sessions, status="running", attempt=1, heartbeat_at=utcnow())
    report = reconcile_once(sessions, publish_grace_s=30, lease_s=60)
    assert report.requeued == [dead] and waiting(sessions, dead)  # for the dispatch step
    failed = status_of(sessions, spent)
    assert (failed.status, failed.error_code) == ("failed", "worker_lost")
    assert failed.finished_at is not None
    assert status_of(sessions, alive).status == "running"


def test_concurrent_reconcilers_take_each_job_once(sessions: sessionmaker[Session]) -> None:
    ids = {add_job(sessions, published_at=utcnow() - timedelta(hours=1)) for _ in range(20)}
    reports: list[Any] = []

    def run() -> None:
        reports.append(reconcile_once(sessions, publish_grace_s=30, lease_s=60))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found = [job_id for r in reports for job_id in r.lost]
    assert sorted(found) == sorted(ids)  # every job once, none twice


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
    report = reconcile_once(sessions, publish_grace_s=30, lease_s=60)
    assert report.pruned_keys == 1
    with sessions() as s:
        assert [k.key for k in s.query(IdempotencyKey).all()] == ["new"]


def test_an_idle_slot_is_evidence_of_a_lost_message(sessions: sessionmaker[Session]) -> None:
    """With a healthy slot idle, a message out for LOST_WHEN_IDLE_S is presumed lost without the grace."""
    from shared.reconcile import LOST_WHEN_IDLE_S

    lost = add_job(sessions, published_at=utcnow() - timedelta(seconds=LOST_WHEN_IDLE_S + 1))
    just_sent = add_job(sessions, published_at=utcnow() - timedelta(seconds=1))
    retry_later = add_job(sessions, published_at=utcnow() + timedelta(minutes=2))  # a backoff's due time
    busy = reconcile_once(sessions, publish_grace_s=30, lease_s=60, idle_slots=0)
    assert busy.lost == []  # every slot busy: the message may be waiting for one
    idle = reconcile_once(sessions, publish_grace_s=30, lease_s=60, idle_slots=1)
    assert idle.lost == [lost] and waiting(sessions, lost)
    assert not waiting(sessions, just_sent) and not waiting(sessions, retry_later)
