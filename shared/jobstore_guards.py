"""The guards and the one write primitive of the jobstore modules (``shared.jobstore`` and its
siblings): what every write of a job row is built from, and nothing else imports these but them.

A status change is one guarded UPDATE (``move``) whose ``WHERE status IN (...)`` is
``shared.jobs.sources_for`` of the new status (``allowed_sources``), so the transition table is
enforced, not decorative. A writer that acts on a row it read names it with a ``Seen``: the write
applies only while the row still has the status and attempt read (and, for an expired lease, a
heartbeat still older than the cutoff). ``not_terminal`` guards the bookkeeping writes, so that none
changes a finished job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Executable, Update, or_, update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.jobs import TERMINAL, JobStatus, sources_for
from shared.models import Job

HELD = JobStatus.RUNNING  # the one status in which an attempt holds a job


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


def lease_expired(cutoff: datetime) -> ColumnElement[bool]:
    """No heartbeat since ``cutoff``: the holder of a running job is presumed lost."""
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)


def allowed_sources(new: JobStatus, within: frozenset[JobStatus] | None = None) -> ColumnElement[bool]:
    """``status IN sources_for(new)``, narrowed to ``within``: the guard of every status change."""
    sources = sources_for(new) if within is None else sources_for(new) & within
    if not sources:  # a writer asking for a move the table forbids: a bug, not a race
        raise ValueError(f"no allowed source for {new} within {sorted(within or ())}")
    return Job.status.in_(sorted(sources))


def not_terminal() -> ColumnElement[bool]:
    """Not terminal: the guard of the bookkeeping writes, so that no write changes a finished job."""
    return Job.status.not_in(sorted(TERMINAL))


def matched(session: Session, stmt: Executable) -> int:
    """Run a write and return how many rows it matched (the session's loaded objects are left
    alone: callers re-read what they show)."""
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return int(cast(CursorResult[Any], result).rowcount or 0)


def move(
    session: Session,
    new: JobStatus,
    where: Sequence[ColumnElement[bool]],
    within: frozenset[JobStatus] | None = None,
    **values: Any,
) -> bool:
    """One row from an allowed source (and ``where``) to ``new``; True if it moved. A move that
    starts or ends a job emits its webhook event in the same transaction (``shared.webhooks``)."""
    stmt = update(Job).where(allowed_sources(new, within), *where).values(status=new, **values)
    name = webhooks.event_of(new, values)
    if name is None:
        return matched(session, stmt) == 1
    return len(moved_rows(session, stmt, name)) == 1


def moved_rows(session: Session, stmt: Update, name: str) -> list[webhooks.Moved]:
    """Run a status move with RETURNING and emit event ``name`` for the rows it moved."""
    returning = stmt.returning(Job.id, Job.tenant_id, Job.batch_id, Job.webhook, Job.webhook_events)
    result = session.execute(returning, execution_options={"synchronize_session": False})
    rows = [webhooks.Moved(*row) for row in result.all()]
    webhooks.on_moved(session, name, rows)
    return rows


__all__ = [
    "HELD",
    "Seen",
    "allowed_sources",
    "lease_expired",
    "matched",
    "move",
    "moved_rows",
    "not_terminal",
]
