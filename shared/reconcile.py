"""The reconciler: the job table is the truth, the broker only a shallow delivery channel.

Jobs that wait for a worker are the dispatcher's (``shared.dispatch``). The reconciler finds the jobs
that left the table's hands and did not come back, and makes them *waiting* again (``published_at``
NULL), so that the dispatch step of the same pass publishes them into a free slot, in fair order,
never into a full broker:
- ``queued`` jobs whose message went out but which no worker started within ``publish_grace_s``: the
  message was lost (Redis restarted empty, the embedded SQL broker lost an in-flight message). Sooner
  when the evidence is plain: a message older than ``LOST_WHEN_IDLE_S`` while a healthy slot is idle
  (the broker holds only messages for free slots, so an idle slot would have taken it). If the message
  was not lost after all, the job runs once anyway: the first claim wins and the other delivery is
  dropped. A retry waiting out its backoff has ``published_at`` at its due time and is left alone;
- ``running`` jobs whose heartbeat expired (the worker died and the broker has not redelivered):
  back to waiting, or failed with ``worker_lost`` once their attempts are spent.

Every change is a guarded UPDATE (``shared.jobstore``) that names the state it read, so several
reconcilers can run at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import idempotency, jobstore, jobstore_queue, logs
from shared.jobs import JobStatus
from shared.models import Job, utcnow

logger = logging.getLogger(__name__)

BATCH = 500  # rows looked at per pass and kind, so one pass stays short
LOST_WHEN_IDLE_S = 5.0  # a message not started this long while a slot is idle is presumed lost


@dataclass
class ReconcileReport:
    lost: list[str] = field(default_factory=list)  # messages presumed lost: the jobs wait again
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pruned_keys: int = 0


def reconcile_once(
    sessions: sessionmaker[Session],
    *,
    publish_grace_s: float,
    lease_s: float,
    now: datetime | None = None,
    idle_slots: int = 0,
) -> ReconcileReport:
    """One pass; ``idle_slots``: healthy slots running no job (``shared.dispatch.idle_slots``)."""
    now = now or utcnow()
    grace = min(publish_grace_s, LOST_WHEN_IDLE_S) if idle_slots > 0 else publish_grace_s
    report = ReconcileReport()
    _expired_leases(sessions, now - timedelta(seconds=lease_s), now, report)
    _lost_messages(sessions, now - timedelta(seconds=grace), report)
    with sessions() as session:  # Idempotency-Keys past their retention
        report.pruned_keys = idempotency.prune(session, now)
        session.commit()
    return report


def _expired_leases(
    sessions: sessionmaker[Session], cutoff: datetime, now: datetime, report: ReconcileReport
) -> None:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested, Job.handbacks)
            .where(Job.status == JobStatus.RUNNING, jobstore.lease_expired(cutoff))
            # one order for every reconciler: rows (and the batch rows a webhook batch's last job
            # counts into) are locked in the same order, so two concurrent passes cannot deadlock
            .order_by(Job.id)
            .limit(BATCH)
        ).all()
        for job_id, attempt, max_attempts, cancel, handbacks in rows:
            seen = jobstore.Seen(job_id, JobStatus.RUNNING, attempt, lease_cutoff=cutoff)
            if cancel or attempt >= max_attempts:
                # A dead worker's job that was being canceled ends canceled; one out of attempts
                # ends failed (worker_lost).
                ended = JobStatus.CANCELED if cancel else JobStatus.FAILED
                done = (
                    jobstore.cancel_unheld(session, seen, now)
                    if cancel
                    else jobstore.fail_lost(session, seen, max_attempts, now, handbacks)
                )
                if done:
                    report.failed.append(job_id)
                    logs.event(
                        logger, f"reconciled_{ended}", job_id=job_id, attempt=attempt, level=logging.WARNING
                    )
                continue
            # Back to waiting: the dispatch step publishes it into a free slot.
            if jobstore_queue.requeue(session, seen):
                report.requeued.append(job_id)
                logs.event(logger, "lease_expired", job_id=job_id, attempt=attempt, level=logging.WARNING)
        session.commit()


def _lost_messages(sessions: sessionmaker[Session], cutoff: datetime, report: ReconcileReport) -> None:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.published_at)
            .where(Job.status == JobStatus.QUEUED, Job.published_at < cutoff)
            .order_by(Job.published_at)
            .limit(BATCH)
        ).all()
        for job_id, published_at in rows:
            # else another reconciler, a worker or a cancel got there first
            if published_at is not None and jobstore_queue.forget_message(session, job_id, published_at):
                report.lost.append(job_id)
                logs.event(logger, "message_lost", job_id=job_id, published_at=published_at.isoformat())
        session.commit()
