"""Deletion, batch cancels and retention's writes of job rows: a jobstore module.

A deleted job is hidden at once (``deleted_at``); once no worker can write it any more (terminal)
its objects are deleted and it is marked *emptied* (``result_key`` and ``checkpoints`` cleared,
``emptied_at`` set), as is a finished job past retention; an emptied deleted row is removed
later (``shared.retention`` says when). These are the only writes to terminal rows: none changes a
status or an outcome, and each is guarded so that it applies once. Like every jobstore module:
functions take a ``Session`` and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.jobs import TERMINAL, JobStatus
from shared.jobstore_guards import allowed_sources, matched, moved_rows, not_terminal
from shared.models import Job, utcnow


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
    queued = allowed_sources(JobStatus.CANCELED, frozenset({JobStatus.QUEUED}))
    stmt = (
        update(Job)
        .where(queued, Job.cancel_requested.is_(True), *where)
        .values(status=JobStatus.CANCELED, finished_at=now, updated_at=now)
    )
    return len(moved_rows(session, stmt, webhooks.COMPLETED))


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
    flag = (
        update(Job)
        .where(*shown, not_terminal())
        .values(cancel_requested=True, deleted_at=now, updated_at=now)
    )
    flagged = matched(session, flag)
    finished = matched(session, update(Job).where(*shown).values(deleted_at=now))  # the rest: terminal
    canceled = _cancel_asked(session, [*scope, Job.deleted_at.is_not(None)], now)
    return StopCounts(canceled, flagged - canceled, finished)


def cancel_batch(session: Session, tenant_id: str, batch_id: str, now: datetime | None = None) -> StopCounts:
    """Cancel every queued job of a batch and ask its running ones to stop (two UPDATEs)."""
    now = now or utcnow()
    shown = [*_scope(tenant_id, None, batch_id), Job.deleted_at.is_(None)]
    total = session.scalar(select(func.count()).select_from(Job).where(*shown)) or 0
    flag = update(Job).where(*shown, not_terminal()).values(cancel_requested=True, updated_at=now)
    flagged = matched(session, flag)
    canceled = _cancel_asked(session, shown, now)
    return StopCounts(canceled, flagged - canceled, total - flagged)


def cancel_deleted(session: Session, now: datetime | None = None) -> int:
    """Deleted jobs queued again (given back by their worker after the delete) end canceled."""
    return _cancel_asked(session, [Job.deleted_at.is_not(None)], now or utcnow())


def mark_emptied(session: Session, job_ids: Sequence[str], now: datetime) -> None:
    """These finished jobs' objects are deleted: clear ``result_key`` and ``checkpoints``, set
    ``emptied_at``."""
    if not job_ids:
        return
    stmt = (
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status.in_(sorted(TERMINAL)))
        .values(result_key=None, checkpoints=[], resume_scale=0, emptied_at=now)
    )
    session.execute(stmt, execution_options={"synchronize_session": False})


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
            Job.emptied_at.is_not(None),
        )
        .returning(Job.tenant_id, Job.content_image_id, Job.style_image_ids, Job.mask_image_ids)
    )
    rows = session.execute(stmt, execution_options={"synchronize_session": False}).all()
    return [(tenant, {content, *(styles or []), *(masks or [])}) for tenant, content, styles, masks in rows]


__all__ = [
    "StopCounts",
    "cancel_batch",
    "cancel_deleted",
    "mark_deleted",
    "mark_emptied",
    "remove_emptied",
]
