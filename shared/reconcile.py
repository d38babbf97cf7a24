"""The reconciler: the job table is the truth, the broker only a hint. Re-publish what was lost.

Two kinds of job need a new message:
- ``queued`` jobs whose message never arrived or was lost (published_at NULL after a crash between
  commit and publish, Redis restarted empty, the embedded SQL broker lost an in-flight message):
  published again when ``published_at`` is older than ``requeue_after_s``;
- ``running`` jobs whose heartbeat expired (the worker died and the broker has not redelivered):
  given back to ``queued`` and published again, or failed with ``worker_lost`` once their attempts
  are spent.

Every change is a guarded UPDATE that names the state it read, so several reconcilers can run at
once: only the one whose UPDATE matched a row publishes. A duplicate message is harmless anyway, since
a worker claims a job with a guarded UPDATE and drops deliveries of jobs it cannot claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import JobStatus
from shared.models import Job, utcnow

logger = logging.getLogger(__name__)

Publish = Callable[[str], None]
BATCH = 500  # rows looked at per pass and kind, so one pass stays short


@dataclass
class ReconcileReport:
    republished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reconcile_once(
    sessions: sessionmaker[Session],
    publish: Publish,
    *,
    requeue_after_s: float,
    lease_s: float,
    now: datetime | None = None,
) -> ReconcileReport:
    now = now or utcnow()
    report = ReconcileReport()
    _expired_leases(sessions, now - timedelta(seconds=lease_s), now, report)
    _stale_queued(sessions, publish, now - timedelta(seconds=requeue_after_s), now, report)
    return report


def _expired_leases(
    sessions: sessionmaker[Session], cutoff: datetime, now: datetime, report: ReconcileReport
) -> None:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING.value)
            .where(or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
            .limit(BATCH)
        ).all()
        for job_id, attempt, max_attempts, cancel in rows:
            guard = and_(
                Job.id == job_id,
                Job.status == JobStatus.RUNNING.value,
                Job.attempt == attempt,
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
            )
            if cancel or attempt >= max_attempts:
                code, status = ("canceled", JobStatus.CANCELED) if cancel else (
                    "worker_lost", JobStatus.FAILED)
                values = dict(status=status.value, finished_at=now)
                if not cancel:
                    values.update(
                        error_code=code,
                        error_message=f"the worker running this job was lost {attempt} times "
                        f"(max_attempts={max_attempts}); checkpoints are kept",
                        error_retryable=False,
                    )
                if session.execute(update(Job).where(guard).values(**values)).rowcount:
                    report.failed.append(job_id)
                    logger.warning("job_event job_id=%s event=reconciled_%s attempt=%s",
                                   job_id, status.value, attempt)
                continue
            # Back to queued with published_at NULL: the queued pass below publishes it.
            if session.execute(
                update(Job).where(guard).values(status=JobStatus.QUEUED.value, published_at=None)
            ).rowcount:
                report.requeued.append(job_id)
                logger.warning("job_event job_id=%s event=lease_expired attempt=%s", job_id, attempt)
        session.commit()


def _stale_queued(
    sessions: sessionmaker[Session],
    publish: Publish,
    cutoff: datetime,
    now: datetime,
    report: ReconcileReport,
) -> None:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.published_at)
            .where(Job.status == JobStatus.QUEUED.value)
            .where(or_(Job.published_at.is_(None), Job.published_at < cutoff))
            .order_by(Job.created_at)
            .limit(BATCH)
        ).all()
    for job_id, published_at in rows:
        with sessions() as session:
            seen = (Job.published_at.is_(None) if published_at is None
                    else Job.published_at == published_at)
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, seen)
                .values(published_at=now)
            ).rowcount
            session.commit()
        if not claimed:
            continue  # another reconciler, a worker or a cancel got there first
        try:
            publish(job_id)
        except Exception:
            # Leave it for the next pass: put published_at back so the job stays "unpublished".
            logger.exception("job_event job_id=%s event=republish_failed", job_id)
            with sessions() as session:
                session.execute(
                    update(Job).where(Job.id == job_id, Job.published_at == now)
                    .values(published_at=published_at)
                )
                session.commit()
            continue
        report.republished.append(job_id)
        logger.info("job_event job_id=%s event=republished", job_id)


def run_forever(
    sessions: sessionmaker[Session],
    publish: Publish,
    *,
    interval_s: float,
    requeue_after_s: float,
    lease_s: float,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Reconcile every ``interval_s`` until ``stop()``; a failing pass is logged and retried."""
    while not stop():
        try:
            report = reconcile_once(
                sessions, publish, requeue_after_s=requeue_after_s, lease_s=lease_s
            )
            if report.republished or report.requeued or report.failed:
                logger.info(
                    "reconcile republished=%d requeued=%d failed=%d",
                    len(report.republished), len(report.requeued), len(report.failed),
                )
        except Exception:
            logger.exception("reconcile pass failed; retrying in %.0fs", interval_s)
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.5, interval_s))
