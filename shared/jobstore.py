"""Status transitions of job rows, and the map of the jobstore modules: every INSERT, UPDATE and
DELETE of ``jobs`` is a function of one of them, and no other module writes job rows.

* ``shared.jobstore`` (this module): the submission's INSERT, a tenant's cancel, the worker's claim
  and fenced writes, and the ends of jobs no live attempt holds (a cancel, ``worker_lost``).
* ``shared.jobstore_queue``: the dispatch and publish bookkeeping (``published_at``): the
  dispatcher's claims, the reconciler's requeues and forgotten messages, an in-doubt submission's
  unpublished jobs deleted.
* ``shared.jobstore_deletion``: deletes, batch cancels and retention's emptying and removal of rows.
* ``shared.jobstore_guards``: ``Seen``, the guards and the one status-change primitive they share.

A status change is one guarded UPDATE whose ``WHERE status IN (...)`` is ``shared.jobs.sources_for``
of the new status, so the transition table is enforced, not decorative. A write that matched no row
means someone else moved the job first (a cancel, a newer attempt, another reconciler): each function
says so with its result and the caller decides what that means.

* The worker that holds a job writes *fenced*: ``WHERE id = :id AND attempt = :mine AND status =
  'running'``, the attempt number being the fencing token its claim took.
* A writer that acts on a row it read (a claim, the reconciler) names it with a ``Seen``: the write
  applies only while the row still has the status and attempt read (and, for an expired lease, a
  heartbeat still older than the cutoff).

No function here changes a row in a terminal state (``shared.jobstore_deletion`` holds the only
writes to terminal rows, none of which changes a status or an outcome). Functions take a ``Session``
and never commit: the caller owns the transaction (the API commits the jobs of a submission together
with its images and idempotency key). This is where a later change will emit an event per transition.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, insert, update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.jobs import INITIAL, JobStatus
from shared.jobstore_guards import HELD, Seen, allowed_sources, lease_expired, matched, move
from shared.models import Job, new_id, utcnow

logger = logging.getLogger(__name__)

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
    bucket: str | None = None  # shared.buckets.bucket_key: which jobs it can share a GPU batch with


class CancelResult(enum.StrEnum):
    """What a tenant's cancel did."""

    CANCELED = "canceled"  # a queued job, canceled at once
    REQUESTED = "requested"  # a running job, asked to stop (its worker cancels it)


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
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
) -> list[str]:
    """Bulk-insert queued jobs (one statement). Returns their ids in order. ``costs``: each job's
    pixels x iterations (``JobParams.work``), what fair dispatch charges; ``priority``: within the
    tenant's share, higher first; ``webhook``: where their events go (``shared.webhooks``)."""
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
            "resume_scale": 0,
            "attempt": 0,
            "max_attempts": max_attempts,
            "handbacks": 0,
            "cancel_requested": False,
            "cost": costs[i] if costs is not None else 0,
            "priority": priority,
            "bucket": spec.bucket,
            "webhook": webhook,
            "webhook_events": webhook_events,
            "created_at": now + timedelta(microseconds=i),
            "updated_at": now,
        }
        for i, spec in enumerate(specs)
    ]
    if rows:
        session.execute(insert(Job), rows)
    return [str(row["id"]) for row in rows]


def request_cancel(session: Session, tenant_id: str, job_id: str) -> CancelResult | None:
    """Cancel a queued job at once, or ask a running one to stop; None if it is in neither state."""
    now = utcnow()
    mine = (Job.id == job_id, Job.tenant_id == tenant_id)
    if move(
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
        .where(allowed_sources(JobStatus.CANCELED, frozenset({HELD})), *mine)
        .values(cancel_requested=True, updated_at=now)
    )
    return CancelResult.REQUESTED if matched(session, asked) else None


# -- The worker: a claim, then fenced writes by the attempt it took ---------------------------------


def claim(session: Session, job: Job, worker: str) -> int | None:
    """Take ``job`` (as read) for a new attempt: → running, ``attempt`` + 1, held by ``worker``.
    Returns the new attempt, or None when the row changed since it was read (a lost race)."""
    now = utcnow()
    attempt = job.attempt + 1
    values: dict[str, Any] = {"attempt": attempt, "worker": worker, "heartbeat_at": now}
    if job.started_at is None:
        values["started_at"] = now
    return attempt if move(session, JobStatus.RUNNING, Seen.of(job).guard(), **values) else None


def _held(job_id: str, attempt: int) -> list[ColumnElement[bool]]:
    return [Job.id == job_id, Job.attempt == attempt, Job.status == HELD]


def _fenced_move(session: Session, job_id: str, attempt: int, new: JobStatus, **values: Any) -> bool:
    """A status change by the holder of ``attempt``: from running only."""
    mine = (Job.id == job_id, Job.attempt == attempt)
    return move(session, new, mine, frozenset({HELD}), **values)


def heartbeat(session: Session, job_id: str, attempt: int, progress: dict[str, Any] | None = None) -> bool:
    """The holder is alive (and, with ``progress``, this far); False when fenced out."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    return matched(session, update(Job).where(*_held(job_id, attempt)).values(**values)) == 1


def resume_scale(refs: list[dict[str, Any]]) -> int:
    """The scale an attempt that resumes from the latest of ``refs`` starts at (the engine's rule:
    a checkpoint that ended its scale resumes at the next); 0 with none."""
    if not refs:
        return 0
    last = refs[-1]
    return int(last.get("scale") or 0) + (1 if last.get("end_of_scale") else 0)


def record_checkpoints(
    session: Session, job_id: str, attempt: int, refs: list[dict[str, Any]], *, new: bool = True
) -> bool:
    """Store the holder's checkpoint list (with a heartbeat, and the scale it resumes at); False when
    fenced out. ``new``: the list gained a checkpoint (its webhook ``checkpoint`` event), rather than
    only losing old ones."""
    stmt = (
        update(Job)
        .where(*_held(job_id, attempt))
        .values(checkpoints=refs, resume_scale=resume_scale(refs), heartbeat_at=utcnow())
        .returning(Job.id, Job.tenant_id, Job.batch_id, Job.webhook, Job.webhook_events)
    )
    row = session.execute(stmt, execution_options={"synchronize_session": False}).first()
    if row is None:
        return False
    if new:
        webhooks.on_checkpoint(session, webhooks.Moved(*row))
    return True


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    result_key: str,
    progress: dict[str, Any],
    execution: dict[str, Any] | None = None,
) -> bool:
    """The holder's result is stored; ``execution``: how it ran (``jobs.execution``)."""
    return _fenced_move(
        session,
        job_id,
        attempt,
        JobStatus.SUCCEEDED,
        result_key=result_key,
        progress=progress,
        execution=execution,
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
    session: Session,
    job_id: str,
    attempt: int,
    *,
    graceful: bool,
    message_due: datetime | None = None,
    waiting: bool = False,
    alone: bool = False,
) -> bool:
    """Give a running job back to the queue (attempt kept: the next claim bumps it).

    A graceful hand-back (worker shutdown, or a transient error that the Celery task retries, its
    retries bounded by ``max_retries``) also raises ``max_attempts`` by one, so rolling restarts and
    outages never use up a job's attempts; only lost workers count.

    A message follows: at once (a hand-back), or the task's retry after its backoff, ``message_due``
    at the latest; ``published_at`` is set to that time, so the reconciler does not take the retry
    waiting out its backoff for a lost message. ``waiting``: no message follows (a job a GPU group
    took from the table, worker.batch): it waits in the table again (``published_at`` NULL) for
    the dispatcher. ``alone``: it runs alone from now on (its bucket cleared: a GPU group it was in
    failed as a whole, or it could not go on in the group).
    """
    values: dict[str, Any] = {
        "worker": None,
        "heartbeat_at": None,
        "published_at": None if waiting else message_due or utcnow(),
    }
    if alone:
        values["bucket"] = None
    if graceful:
        values["max_attempts"] = Job.max_attempts + 1
        values["handbacks"] = Job.handbacks + 1
    return _fenced_move(session, job_id, attempt, JobStatus.QUEUED, **values)


def fail_released(session: Session, job_id: str, code: str, message: str) -> bool:
    """Fail a job given back to the queue whose retries are spent (no attempt holds it)."""
    return move(
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
    return move(session, JobStatus.CANCELED, seen.guard(), finished_at=now or utcnow())


def fail_lost(
    session: Session, seen: Seen, max_attempts: int, now: datetime | None = None, handbacks: int = 0
) -> bool:
    """A job whose worker was lost in every one of its attempts ends ``worker_lost``. ``handbacks``:
    the job's graceful hand-backs, which raised ``max_attempts`` and are no loss."""
    message = (
        f"the worker running this job was lost {seen.attempt - handbacks} times "
        f"(max_attempts={max_attempts - handbacks}); its checkpoints are kept"
    )
    return move(
        session,
        JobStatus.FAILED,
        seen.guard(),
        finished_at=now or utcnow(),
        error_code=WORKER_LOST,
        error_message=message,
        error_retryable=WORKER_LOST_RETRYABLE,
    )


__all__ = [
    "HELD",
    "WORKER_LOST",
    "CancelResult",
    "JobSpec",
    "Seen",
    "cancel",
    "cancel_unheld",
    "claim",
    "fail",
    "fail_lost",
    "fail_released",
    "heartbeat",
    "insert_queued",
    "lease_expired",
    "record_checkpoints",
    "resume_scale",
    "release",
    "request_cancel",
    "succeed",
]
