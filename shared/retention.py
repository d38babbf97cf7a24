"""Deletion and retention: what a tenant's deletes and ``purge_once`` (every dispatcher pass) remove.

A delete hides rows at once (``deleted_at``) and asks live jobs to stop. A hidden job is *emptied*
once no worker can write it any more (terminal): result, checkpoints and every attempt's result
deleted, ``emptied_at`` set (by the API if finished, else by the pass after its worker
stopped); it is *removed* ``DELETED_GRACE`` after the delete, then its batch if deleted and empty,
and the images no job row names any more. Retention empties a finished job ``retention_days`` after
``finished_at`` and keeps it visible (410 ``result_expired``). Rows are written first, objects
deleted after: a failure leaves an orphan for ``shared.orphans.sweep_orphans``, never a row
naming nothing.

This module holds the deletes (``delete_jobs``) and the emptying of finished jobs that they and the
pass share; ``shared.purge`` the pass (``purge_once``) and the images it deletes;
``shared.jobstore_deletion`` the writes of job rows both make.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from shared import jobstore_deletion, logs, storage_keys
from shared.jobs import TERMINAL
from shared.models import Batch, Job, utcnow
from shared.storage import Listing, Storage, StorageError

logger = logging.getLogger(__name__)

BATCH = 200  # rows each step of a pass takes at most
DELETED_GRACE = timedelta(hours=1)  # a deleted row (and its images) stays this long after the delete


@dataclass
class PurgeReport:
    canceled: int = 0  # deleted jobs queued again, canceled
    emptied: list[str] = field(default_factory=list)  # deleted jobs whose objects were deleted
    expired: list[str] = field(default_factory=list)  # finished jobs past retention, emptied
    removed_jobs: int = 0
    removed_batches: int = 0
    removed_images: list[str] = field(default_factory=list)
    objects: int = 0  # object deletes done (keys, existing or not)


@dataclass(frozen=True)
class Deletion:
    """What ``delete_jobs`` did; ``done`` unless a job still runs or storage refused a delete."""

    counts: jobstore_deletion.StopCounts
    running: int  # still running: emptied by the pass after its worker stopped
    objects_left: bool  # storage failed: the orphan sweep deletes what is left

    @property
    def done(self) -> bool:
        return not self.running and not self.objects_left


def result_expired(job: Job) -> bool:
    """The job's result and checkpoints were deleted (retention, or a delete)."""
    return job.emptied_at is not None


def terminal() -> ColumnElement[bool]:
    """Finished: no worker writes the row any more."""
    return Job.status.in_(sorted(TERMINAL))


def emptied() -> ColumnElement[bool]:
    """Emptied: the job's objects were deleted (``emptied_at`` set)."""
    return Job.emptied_at.is_not(None)


def delete_jobs(
    session: Session,
    storage: Storage,
    tenant_id: str,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
    now: datetime | None = None,
) -> Deletion:
    """Delete a tenant's job, or a batch and all its jobs: hidden and stopped at once (committed),
    finished ones emptied now, running ones later. A few statements, whatever the number of jobs."""
    now = now or utcnow()
    counts = jobstore_deletion.mark_deleted(session, tenant_id, job_id=job_id, batch_id=batch_id, now=now)
    scope = [Job.tenant_id == tenant_id, Job.deleted_at.is_not(None)]
    if batch_id is not None:
        scope.append(Job.batch_id == batch_id)
        mine = (Batch.id == batch_id, Batch.tenant_id == tenant_id, Batch.deleted_at.is_(None))
        session.execute(update(Batch).where(*mine).values(deleted_at=now))
    if job_id is not None:
        scope.append(Job.id == job_id)
    session.commit()
    _, ok = empty_jobs(session, storage, scope, now, None)
    running = session.scalar(select(func.count()).select_from(Job).where(*scope, ~terminal())) or 0
    return Deletion(counts, running, not ok)


def job_keys(job_id: str, attempt: int, params: Any, result: str | None, refs: Any) -> set[str]:
    """Every object a job may have: its result, each attempt's result, the thumbnails of these, its
    checkpoints with their previews and thumbnails (a row of an earlier version names no thumbnail:
    deleting one that was never written is harmless)."""
    fmt = str((params or {}).get("output_format") or "png")
    keys = {storage_keys.result_key(job_id, a, fmt) for a in range(1, attempt + 1)}
    keys |= {storage_keys.result_thumb_key(job_id, a) for a in range(1, attempt + 1)}
    if result:
        keys |= {result} | ({thumb} if (thumb := storage_keys.result_thumb_of(result)) else set())
    for ref in refs or []:
        keys.update(
            str(ref[f]) for f in storage_keys.CHECKPOINT_REF_KEYS if isinstance(ref, dict) and ref.get(f)
        )
    return keys


def empty_jobs(
    session: Session,
    storage: Storage,
    where: Sequence[ColumnElement[bool]],
    now: datetime,
    limit: int | None,
    report: PurgeReport | None = None,
) -> tuple[list[str], bool]:
    """Empty the finished jobs of ``where``: rows first (committed), then their objects. Returns
    their ids, and False if storage failed (the orphan sweep gets what is left)."""
    query = select(Job.id, Job.attempt, Job.params, Job.result_key, Job.checkpoints)
    rows = session.execute(query.where(*where, terminal(), ~emptied()).order_by(Job.id).limit(limit)).all()
    if not rows:
        return [], True
    jobstore_deletion.mark_emptied(session, [r.id for r in rows], now)
    session.commit()
    keys = set().union(*(job_keys(r.id, r.attempt, r.params, r.result_key, r.checkpoints) for r in rows))
    try:
        delete_keys(storage, sorted(keys), report)
    except StorageError as exc:
        logs.event(logger, "delete_failed", kind="retention", level=logging.WARNING, error=repr(exc))
        return [r.id for r in rows], False
    for row in rows:
        logs.event(logger, "emptied", kind="retention", job_id=row.id)
    return [r.id for r in rows], True


def delete_keys(storage: Storage, keys: Sequence[str], report: PurgeReport | None) -> None:
    """Delete these objects (in bulk where the backend can), counted in ``report``."""
    if isinstance(storage, Listing):
        storage.delete_many(keys)
    else:
        for key in keys:
            storage.delete(key)
    if report is not None:
        report.objects += len(keys)


__all__ = [
    "BATCH",
    "DELETED_GRACE",
    "Deletion",
    "PurgeReport",
    "delete_jobs",
    "job_keys",
    "result_expired",
]
