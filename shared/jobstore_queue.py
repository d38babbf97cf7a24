"""The dispatch and publish bookkeeping of job rows (``published_at``): a jobstore module.

A queued job *waits* while ``published_at`` is NULL; the dispatcher (``shared.dispatch``) claims
waiting jobs for publishing and gives back those the broker did not take; the reconciler
(``shared.reconcile``) makes a job wait again when its lease expired or its message is presumed lost;
an in-doubt submission (``api.commit_recovery``) deletes the jobs it never published. Each write is
guarded by the state read (status, ``published_at``, a ``Seen``), so of several writers one wins,
and none changes a finished job. Like every jobstore module: functions take a ``Session`` and never
commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from shared.jobs import JobStatus
from shared.jobstore_guards import Seen, matched, move
from shared.models import Job


def claim_dispatch(session: Session, job_ids: Sequence[str], now: datetime) -> list[str]:
    """The dispatcher takes these waiting jobs for publishing (``published_at`` NULL → ``now``);
    returns, in the given order, those it took (another pass, a cancel or a delete may have won)."""
    if not job_ids:
        return []
    stmt = (
        update(Job)
        .where(
            Job.id.in_(list(job_ids)),
            Job.status == JobStatus.QUEUED,
            Job.published_at.is_(None),
            Job.deleted_at.is_(None),
        )
        .values(published_at=now)
        .returning(Job.id)
    )
    taken = set(session.execute(stmt, execution_options={"synchronize_session": False}).scalars())
    return [job_id for job_id in job_ids if job_id in taken]


def unclaim_dispatch(session: Session, job_ids: Sequence[str], now: datetime) -> int:
    """The broker did not take these messages: the jobs wait again (``published_at`` NULL)."""
    stmt = (
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED, Job.published_at == now)
        .values(published_at=None)
    )
    return matched(session, stmt)


def delete_unpublished(session: Session, job_ids: Sequence[str]) -> int:
    """Delete those of these jobs that are still queued and were never published (an in-doubt
    submission undone); returns how many."""
    stmt = delete(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED, Job.published_at.is_(None))
    return matched(session, stmt)


def requeue(session: Session, seen: Seen) -> bool:
    """A running job whose lease expired goes back to waiting (queued, ``published_at`` NULL): the
    dispatcher publishes it into a free slot."""
    return move(session, JobStatus.QUEUED, seen.guard(), published_at=None, worker=None, heartbeat_at=None)


def forget_message(session: Session, job_id: str, published_at: datetime) -> bool:
    """A queued job's message (sent at ``published_at``) is presumed lost: the job waits again
    (``published_at`` NULL), for the dispatcher. Guarded by the time read, so one reconciler of
    several does it."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.published_at == published_at)
        .values(published_at=None)
    )
    return matched(session, stmt) == 1


__all__ = ["claim_dispatch", "delete_unpublished", "forget_message", "requeue", "unclaim_dispatch"]
