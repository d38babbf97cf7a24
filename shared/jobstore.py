"""The one writer of job rows: every INSERT, UPDATE and DELETE of ``jobs`` is a function here.

A status change is one guarded UPDATE whose ``WHERE status IN (...)`` is ``shared.jobs.sources_for``
of the new status, so the transition table is enforced, not decorative. A write that matched no row
means someone else moved the job first (a cancel, a newer attempt, another reconciler): each function
says so with its result and the caller decides what that means.

* The worker that holds a job writes *fenced*: ``WHERE id = :id AND attempt = :mine AND status =
  'running'``, the attempt number being the fencing token its claim took.
* A writer that acts on a row it read (a claim, the reconciler) names it with a ``Seen``: the write
  applies only while the row still has the status and attempt read (and, for an expired lease, a
  heartbeat still older than the cutoff).

No function here changes a row in a terminal state. Functions take a ``Session`` and never commit:
the caller owns the transaction (the API commits the jobs of a submission together with its images
and idempotency key). This is where a later change will emit an event per transition.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Executable,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from shared.jobs import INITIAL, TERMINAL, JobStatus, sources_for
from shared.models import Job, new_id, utcnow

logger = logging.getLogger(__name__)

HELD = JobStatus.RUNNING  # the one status in which an attempt holds a job
MESSAGE_MAX = 2000  # characters of an error message kept
WORKER_LOST = "worker_lost"
# One code, one flag: a job whose worker died in every one of its attempts (graceful hand-backs do
# not count) most likely kills its worker (memory, a driver fault); submitting it again as it is
# would do the same, as for ``out_of_memory``.
WORKER_LOST_RETRYABLE = False


@dataclass(frozen=True)
class JobSpec:
    """One job to create: its content image, styles and optional masks (one per style)."""

    content_id: str
    style_ids: tuple[str, ...]
    mask_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Seen:
    """A job row as its caller read it; a write guarded by it applies only if the row is still so."""

    job_id: str
    status: JobStatus
    attempt: int
    lease_cutoff: datetime | None = None  # also: its heartbeat is still none or older than this

    @classmethod
    def of(cls, job: Job) -> Seen:
        return cls(job.id, JobStatus(job.status), job.attempt)

    def guard(self) -> list[ColumnElement[bool]]:
        where = [Job.id == self.job_id, Job.status == self.status, Job.attempt == self.attempt]
        if self.lease_cutoff is not None:
            where.append(lease_expired(self.lease_cutoff))
        return where


class CancelResult(enum.StrEnum):
    """What a tenant's cancel did."""

    CANCELED = "canceled"  # a queued job, canceled at once
    REQUESTED = "requested"  # a running job, asked to stop (its worker cancels it)


def lease_expired(cutoff: datetime) -> ColumnElement[bool]:
    """No heartbeat since ``cutoff``: the holder of a running job is presumed lost."""
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)


def _sources(new: JobStatus, within: frozenset[JobStatus] | None = None) -> ColumnElement[bool]:
    """``status IN sources_for(new)``, narrowed to ``within``: the guard of every status change."""
    sources = sources_for(new) if within is None else sources_for(new) & within
    if not sources:  # a writer asking for a move the table forbids: a bug, not a race
        raise ValueError(f"no allowed source for {new} within {sorted(within or ())}")
    return Job.status.in_(sorted(sources))


def _live() -> ColumnElement[bool]:
    """Not terminal: the guard of the bookkeeping writes, so that no write changes a finished job."""
    return Job.status.not_in(sorted(TERMINAL))


def _rows(session: Session, stmt: Executable) -> int:
    """Run a write and return how many rows it matched (the session's loaded objects are left
    alone: callers re-read what they show)."""
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _move(
    session: Session,
    new: JobStatus,
    where: Sequence[ColumnElement[bool]],
    within: frozenset[JobStatus] | None = None,
    **values: Any,
) -> bool:
    """One row from an allowed source (and ``where``) to ``new``; True if it moved."""
    stmt = update(Job).where(_sources(new, within), *where).values(status=new, **values)
    return _rows(session, stmt) == 1


# -- Submission (API) -------------------------------------------------------------------------------


def insert_queued(
    session: Session,
    *,
    tenant_id: str,
    batch_id: str | None,
    specs: Sequence[JobSpec],
    params: dict[str, Any],
    max_attempts: int,
    costs: Sequence[int] | None = None,
    priority: int = 0,
) -> list[str]:
    """Bulk-insert queued jobs (one statement). Returns their ids in order. ``costs``: each job's
    pixels x iterations (``JobParams.work``), what fair dispatch charges; ``priority``: within the
    tenant's share, higher first."""
    now = utcnow()  # + i microseconds: (created_at, id) order is the submission order
    rows: list[dict[str, Any]] = [
        {
            "id": new_id(),
            "tenant_id": tenant_id,
            "batch_id": batch_id,
            "status": INITIAL,
            "params": params,
            "content_image_id": spec.content_id,
            "style_image_ids": list(spec.style_ids),
            "mask_image_ids": None if spec.mask_ids is None else list(spec.mask_ids),
            "progress": {},
            "checkpoints": [],
            "attempt": 0,
            "max_attempts": max_attempts,
            "cancel_requested": False,
            "cost": costs[i] if costs is not None else 0,
            "priority": priority,
            "created_at": now + timedelta(microseconds=i),
            "updated_at": now,
        }
        for i, spec in enumerate(specs)
    ]
    if rows:
        session.execute(insert(Job), rows)
    return [str(row["id"]) for row in rows]


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
    return _rows(session, stmt)


def delete_unpublished(session: Session, job_ids: Sequence[str]) -> int:
    """Delete those of these jobs that are still queued and were never published (an in-doubt
    submission undone); returns how many."""
    stmt = delete(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED, Job.published_at.is_(None))
    return _rows(session, stmt)


def request_cancel(session: Session, tenant_id: str, job_id: str) -> CancelResult | None:
    """Cancel a queued job at once, or ask a running one to stop; None if it is in neither state."""
    now = utcnow()
    mine = (Job.id == job_id, Job.tenant_id == tenant_id)
    if _move(
        session,
        JobStatus.CANCELED,
        mine,
        frozenset({JobStatus.QUEUED}),
        cancel_requested=True,
        finished_at=now,
        updated_at=now,
    ):
        return CancelResult.CANCELED
    asked = (
        update(Job)
        .where(_sources(JobStatus.CANCELED, frozenset({HELD})), *mine)
        .values(cancel_requested=True, updated_at=now)
    )
    return CancelResult.REQUESTED if _rows(session, asked) else None


# -- The worker: a claim, then fenced writes by the attempt it took ---------------------------------


def claim(session: Session, job: Job, worker: str) -> int | None:
    """Take ``job`` (as read) for a new attempt: → running, ``attempt`` + 1, held by ``worker``.
    Returns the new attempt, or None when the row changed since it was read (a lost race)."""
    now = utcnow()
    attempt = job.attempt + 1
    values: dict[str, Any] = {"attempt": attempt, "worker": worker, "heartbeat_at": now}
    if job.started_at is None:
        values["started_at"] = now
    return attempt if _move(session, JobStatus.RUNNING, Seen.of(job).guard(), **values) else None


def _held(job_id: str, attempt: int) -> list[ColumnElement[bool]]:
    return [Job.id == job_id, Job.attempt == attempt, Job.status == HELD]


def _fenced_move(session: Session, job_id: str, attempt: int, new: JobStatus, **values: Any) -> bool:
    """A status change by the holder of ``attempt``: from running only."""
    mine = (Job.id == job_id, Job.attempt == attempt)
    return _move(session, new, mine, frozenset({HELD}), **values)


def heartbeat(session: Session, job_id: str, attempt: int, progress: dict[str, Any] | None = None) -> bool:
    """The holder is alive (and, with ``progress``, this far); False when fenced out."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    return _rows(session, update(Job).where(*_held(job_id, attempt)).values(**values)) == 1


def record_checkpoints(session: Session, job_id: str, attempt: int, refs: list[dict[str, Any]]) -> bool:
    """Store the holder's checkpoint list (with a heartbeat); False when fenced out."""
    stmt = update(Job).where(*_held(job_id, attempt)).values(checkpoints=refs, heartbeat_at=utcnow())
    return _rows(session, stmt) == 1


def succeed(session: Session, job_id: str, attempt: int, result_key: str, progress: dict[str, Any]) -> bool:
    return _fenced_move(
        session,
        job_id,
        attempt,
        JobStatus.SUCCEEDED,
        result_key=result_key,
        progress=progress,
        finished_at=utcnow(),
        error_code=None,
        error_message=None,
        error_retryable=None,
    )


def fail(session: Session, job_id: str, attempt: int, code: str, message: str, retryable: bool) -> bool:
    return _fenced_move(
        session,
        job_id,
        attempt,
        JobStatus.FAILED,
        error_code=code,
        error_message=message[:MESSAGE_MAX],
        error_retryable=retryable,
        finished_at=utcnow(),
    )


def cancel(session: Session, job_id: str, attempt: int) -> bool:
    """The holder saw the cancel request and stopped."""
    return _fenced_move(session, job_id, attempt, JobStatus.CANCELED, finished_at=utcnow())


def release(
    session: Session, job_id: str, attempt: int, *, graceful: bool, message_due: datetime | None = None
) -> bool:
    """Give a running job back to the queue (attempt kept: the next claim bumps it).

    A graceful hand-back (worker shutdown, or a transient error that the Celery task retries, its
    retries bounded by ``max_retries``) also raises ``max_attempts`` by one, so rolling restarts and
    outages never use up a job's attempts; only lost workers count.

    A message follows: at once (a hand-back), or the task's retry after its backoff, ``message_due``
    at the latest; ``published_at`` is set to that time, so the reconciler does not take the retry
    waiting out its backoff for a lost message.
    """
    values: dict[str, Any] = {
        "worker": None,
        "heartbeat_at": None,
        "published_at": message_due or utcnow(),
    }
    if graceful:
        values["max_attempts"] = Job.max_attempts + 1
    return _fenced_move(session, job_id, attempt, JobStatus.QUEUED, **values)


def fail_released(session: Session, job_id: str, code: str, message: str) -> bool:
    """Fail a job given back to the queue whose retries are spent (no attempt holds it)."""
    return _move(
        session,
        JobStatus.FAILED,
        [Job.id == job_id],
        frozenset({JobStatus.QUEUED}),
        error_code=code,
        error_message=message[:MESSAGE_MAX],
        error_retryable=True,
        finished_at=utcnow(),
    )


# -- Jobs no live attempt holds: seen by a new delivery's claim or by the reconciler ---------------


def cancel_unheld(session: Session, seen: Seen, now: datetime | None = None) -> bool:
    """A job whose cancel was requested and which no live worker runs ends canceled."""
    return _move(session, JobStatus.CANCELED, seen.guard(), finished_at=now or utcnow())


def fail_lost(session: Session, seen: Seen, max_attempts: int, now: datetime | None = None) -> bool:
    """A job whose worker was lost in every one of its attempts ends ``worker_lost``."""
    message = (
        f"the worker running this job was lost {seen.attempt} times "
        f"(max_attempts={max_attempts}); its checkpoints are kept"
    )
    return _move(
        session,
        JobStatus.FAILED,
        seen.guard(),
        finished_at=now or utcnow(),
        error_code=WORKER_LOST,
        error_message=message,
        error_retryable=WORKER_LOST_RETRYABLE,
    )


def requeue(session: Session, seen: Seen) -> bool:
    """A running job whose lease expired goes back to waiting (queued, ``published_at`` NULL): the
    dispatcher publishes it into a free slot."""
    return _move(session, JobStatus.QUEUED, seen.guard(), published_at=None, worker=None, heartbeat_at=None)


def forget_message(session: Session, job_id: str, published_at: datetime) -> bool:
    """A queued job's message (sent at ``published_at``) is presumed lost: the job waits again
    (``published_at`` NULL), for the dispatcher. Guarded by the time read, so one reconciler of
    several does it."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.published_at == published_at)
        .values(published_at=None)
    )
    return _rows(session, stmt) == 1


# -- Deletion and retention -------------------------------------------------------------------------
# A deleted job is hidden at once (``deleted_at``); once no worker can write it any more (terminal)
# its objects are deleted and it is marked *emptied* (``result_key`` and ``checkpoints`` cleared,
# ``EMPTIED`` in its progress), as is a finished job past retention; an emptied deleted row is removed
# later (``shared.retention`` says when). These are the only writes to terminal rows: none changes a
# status or an outcome, and each is guarded so that it applies once.

EMPTIED = "result_expired_at"  # progress key: when the job's result and checkpoints were deleted


@dataclass(frozen=True)
class StopCounts:
    """What a delete or a batch cancel did to the jobs it named."""

    canceled: int  # queued: canceled at once
    cancel_requested: int  # running: asked to stop (its worker cancels it)
    already_finished: int  # finished before: left as they were


def _scope(tenant_id: str, job_id: str | None, batch_id: str | None) -> list[ColumnElement[bool]]:
    where = [Job.tenant_id == tenant_id]
    if job_id is not None:
        where.append(Job.id == job_id)
    if batch_id is not None:
        where.append(Job.batch_id == batch_id)
    return where


def _cancel_asked(session: Session, where: Sequence[ColumnElement[bool]], now: datetime) -> int:
    """Queued jobs of ``where`` whose cancel was requested end canceled (one guarded UPDATE)."""
    queued = _sources(JobStatus.CANCELED, frozenset({JobStatus.QUEUED}))
    stmt = (
        update(Job)
        .where(queued, Job.cancel_requested.is_(True), *where)
        .values(status=JobStatus.CANCELED, finished_at=now, updated_at=now)
    )
    return _rows(session, stmt)


def mark_deleted(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
    now: datetime | None = None,
) -> StopCounts:
    """Hide a tenant's job, or every job of one of its batches, in three UPDATEs whatever their
    number: live ones are flagged to stop in the same statement that hides them (so a job moving
    between queued and running meanwhile is flagged either way), then the queued ones are canceled.
    Jobs already hidden are left alone."""
    now = now or utcnow()
    scope = _scope(tenant_id, job_id, batch_id)
    shown = [*scope, Job.deleted_at.is_(None)]
    flag = update(Job).where(*shown, _live()).values(cancel_requested=True, deleted_at=now, updated_at=now)
    flagged = _rows(session, flag)
    finished = _rows(session, update(Job).where(*shown).values(deleted_at=now))  # the rest: terminal
    canceled = _cancel_asked(session, [*scope, Job.deleted_at.is_not(None)], now)
    return StopCounts(canceled, flagged - canceled, finished)


def cancel_batch(session: Session, tenant_id: str, batch_id: str, now: datetime | None = None) -> StopCounts:
    """Cancel every queued job of a batch and ask its running ones to stop (two UPDATEs)."""
    now = now or utcnow()
    shown = [*_scope(tenant_id, None, batch_id), Job.deleted_at.is_(None)]
    total = session.scalar(select(func.count()).select_from(Job).where(*shown)) or 0
    flag = update(Job).where(*shown, _live()).values(cancel_requested=True, updated_at=now)
    flagged = _rows(session, flag)
    canceled = _cancel_asked(session, shown, now)
    return StopCounts(canceled, flagged - canceled, total - flagged)


def cancel_deleted(session: Session, now: datetime | None = None) -> int:
    """Deleted jobs queued again (given back by their worker after the delete) end canceled."""
    return _cancel_asked(session, [Job.deleted_at.is_not(None)], now or utcnow())


def mark_emptied(session: Session, jobs: Sequence[tuple[str, dict[str, Any] | None]], now: datetime) -> None:
    """These finished jobs' objects are deleted: clear ``result_key`` and ``checkpoints`` and add
    ``EMPTIED`` to the progress each had (``jobs``: (id, progress) as read). One executemany."""
    if not jobs:
        return
    finished = or_(*(Job.status == status for status in sorted(TERMINAL)))  # no IN in an executemany
    stmt = (
        update(Job)
        .where(Job.id == bindparam("job"), finished)
        .values(result_key=None, checkpoints=[], progress=bindparam("emptied"))
    )
    stamp = now.isoformat()
    rows = [{"job": job_id, "emptied": {**(p or {}), EMPTIED: stamp}} for job_id, p in jobs]
    session.connection().execute(stmt, rows)  # Core executemany (not the ORM's bulk UPDATE by key)


def remove_emptied(session: Session, job_ids: Sequence[str]) -> list[tuple[str, set[str]]]:
    """Delete those of these rows that are deleted, finished and emptied; returns the tenant and
    the image ids each removed row named."""
    if not job_ids:
        return []
    stmt = (
        delete(Job)
        .where(
            Job.id.in_(list(job_ids)),
            Job.deleted_at.is_not(None),
            Job.status.in_(sorted(TERMINAL)),
            Job.progress[EMPTIED].as_string().is_not(None),
        )
        .returning(Job.tenant_id, Job.content_image_id, Job.style_image_ids, Job.mask_image_ids)
    )
    rows = session.execute(stmt, execution_options={"synchronize_session": False}).all()
    return [(tenant, {content, *(styles or []), *(masks or [])}) for tenant, content, styles, masks in rows]


__all__ = [
    "EMPTIED",
    "HELD",
    "WORKER_LOST",
    "CancelResult",
    "JobSpec",
    "Seen",
    "StopCounts",
    "cancel",
    "cancel_batch",
    "cancel_deleted",
    "cancel_unheld",
    "claim",
    "claim_dispatch",
    "delete_unpublished",
    "fail",
    "fail_lost",
    "fail_released",
    "forget_message",
    "heartbeat",
    "insert_queued",
    "lease_expired",
    "mark_deleted",
    "mark_emptied",
    "record_checkpoints",
    "remove_emptied",
    "release",
    "request_cancel",
    "requeue",
    "succeed",
    "unclaim_dispatch",
]
