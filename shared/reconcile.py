"""The reconciler: the job table is the truth, the broker only a hint. Re-publish what was lost.

Two kinds of job need a new message:
- ``queued`` jobs whose message never arrived or was lost: published again when ``published_at`` is
  older than ``requeue_after_s`` (Redis restarted empty, the embedded SQL broker lost an in-flight
  message), or still NULL ``UNPUBLISHED_GRACE`` after the job was last changed (the API crashed
  between its commit and its publish; the grace keeps us from racing an API that is publishing now);
- ``running`` jobs whose heartbeat expired (the worker died and the broker has not redelivered):
  given back to ``queued`` and published again, or failed with ``worker_lost`` once their attempts
  are spent.

Every change is a guarded UPDATE (``shared.jobstore``) that names the state it read, so several
reconcilers can run at once: only the one whose UPDATE matched a row publishes. A duplicate message is
harmless anyway, since a worker claims a job with a guarded UPDATE and drops deliveries of jobs it
cannot claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared import idempotency, jobstore, logs
from shared.jobs import JobStatus
from shared.models import Job, utcnow

logger = logging.getLogger(__name__)

Publish = Callable[[str], None]
BATCH = 500  # rows looked at per pass and kind, so one pass stays short
UNPUBLISHED_GRACE = timedelta(seconds=30)


@dataclass
class ReconcileReport:
    republished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pruned_keys: int = 0


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
    for job_id in report.requeued:  # given back just now: publish at once, no grace
        _publish_claimed(sessions, publish, job_id, None, now, report)
    _stale_queued(sessions, publish, now - timedelta(seconds=requeue_after_s), now, report)
    with sessions() as session:  # Idempotency-Keys past their retention
        report.pruned_keys = idempotency.prune(session, now)
        session.commit()
    return report


def _expired_leases(
    sessions: sessionmaker[Session], cutoff: datetime, now: datetime, report: ReconcileReport
) -> None:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING, jobstore.lease_expired(cutoff))
            .limit(BATCH)
        ).all()
        for job_id, attempt, max_attempts, cancel in rows:
            seen = jobstore.Seen(job_id, JobStatus.RUNNING, attempt, lease_cutoff=cutoff)
            if cancel or attempt >= max_attempts:
                # A dead worker's job that was being canceled ends canceled; one out of attempts
                # ends failed (worker_lost).
                ended = JobStatus.CANCELED if cancel else JobStatus.FAILED
                done = (
                    jobstore.cancel_unheld(session, seen, now)
                    if cancel
                    else jobstore.fail_lost(session, seen, max_attempts, now)
                )
                if done:
                    report.failed.append(job_id)
                    logs.event(
                        logger, f"reconciled_{ended}", job_id=job_id, attempt=attempt, level=logging.WARNING
                    )
                continue
            # Back to queued; published_at is set when the message goes out (below).
            if jobstore.requeue(session, seen, now):
                report.requeued.append(job_id)
                logs.event(logger, "lease_expired", job_id=job_id, attempt=attempt, level=logging.WARNING)
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
            .where(Job.status == JobStatus.QUEUED)
            .where(
                or_(
                    and_(Job.published_at.is_(None), Job.updated_at < now - UNPUBLISHED_GRACE),
                    Job.published_at < cutoff,
                )
            )
            .order_by(Job.created_at)
            .limit(BATCH)
        ).all()
    for job_id, published_at in rows:
        with sessions() as session:
            claimed = jobstore.claim_publish(session, job_id, published_at, now)
            session.commit()
        if claimed:  # else another reconciler, a worker or a cancel got there first
            _publish_claimed(sessions, publish, job_id, published_at, now, report)


def _publish_claimed(
    sessions: sessionmaker[Session],
    publish: Publish,
    job_id: str,
    previous: datetime | None,
    now: datetime,
    report: ReconcileReport,
) -> None:
    """Publish a job whose published_at this reconciler set to ``now``; undo that if it fails."""
    try:
        publish(job_id)
    except Exception:  # noqa: BLE001 - logged with its traceback; the job is left for the next pass
        logs.event(logger, "republish_failed", job_id=job_id, level=logging.ERROR, exc_info=True)
        with sessions() as session:  # leave the job for the next pass
            jobstore.unclaim_publish(session, job_id, now, previous)
            session.commit()
        return
    report.republished.append(job_id)
    logs.event(logger, "republished", job_id=job_id)


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
            report = reconcile_once(sessions, publish, requeue_after_s=requeue_after_s, lease_s=lease_s)
            if report.republished or report.requeued or report.failed:
                logger.info(
                    "reconcile republished=%d requeued=%d failed=%d",
                    len(report.republished),
                    len(report.requeued),
                    len(report.failed),
                )
        except Exception:
            logger.exception("reconcile pass failed; retrying in %.0fs", interval_s)
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.5, interval_s))
