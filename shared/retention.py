"""Deletion and retention: what a tenant's deletes and ``purge_once`` (every dispatcher pass) remove.

A delete hides rows at once (``deleted_at``) and asks live jobs to stop. A hidden job is *emptied*
once no worker can write it any more (terminal): result, checkpoints and every attempt's result
deleted, ``EMPTIED`` in its progress (by the API if finished, else by the pass after its worker
stopped); it is *removed* ``DELETED_GRACE`` after the delete, then its batch if deleted and empty,
and the images no job row names any more. Retention empties a finished job ``retention_days`` after
``finished_at`` and keeps it visible (410 ``result_expired``). Rows are written first, objects
deleted after: a failure leaves an orphan for ``shared.orphans.sweep_orphans``, never a row
naming nothing.

Images are content-addressed and shared: job rows are their reference counts (content, styles,
masks; hidden rows count until removed). When a removed row was its tenant's last job naming an
image, that tenant's ``tenant_images`` row goes too (even if other tenants' jobs keep the image). An
image no row names is deleted (object, ``images``, ``tenant_images``) unless an ownership row is left
that no job released: an upload no job used yet, kept ``retention_days`` (forever with 0).

The race with a submission naming an image being deleted: one transaction locks the image rows
(PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite: a write takes the database lock first), checks in a
new statement that no job row names them, deletes the rows, then the objects, then commits. A
submission that wrote a job naming the image as content, or an ownership row, holds a key-share lock
through the foreign key: the image is skipped, and found named next pass. One after the commit finds
no row (``unknown_image``; an upload stores the bytes again, the object being gone). An image named by
id is read ``FOR KEY SHARE`` (``api.imagestore.check_owned``) until the submission commits, so it is
skipped too; ``DELETED_GRACE`` keeps an image an hour past its last reference besides. A commit
failing after the objects went leaves unreferenced rows: the next pass deletes them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, delete, exists, func, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from shared import jobstore, logs, storage_keys
from shared.jobs import TERMINAL
from shared.models import Batch, Job, StoredImage, TenantImage, utcnow
from shared.settings import Settings
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

    counts: jobstore.StopCounts
    running: int  # still running: emptied by the pass after its worker stopped
    objects_left: bool  # storage failed: the orphan sweep deletes what is left

    @property
    def done(self) -> bool:
        return not self.running and not self.objects_left


def result_expired(job: Job) -> bool:
    """The job's result and checkpoints were deleted (retention, or a delete)."""
    return bool((job.progress or {}).get(jobstore.EMPTIED))


def _terminal() -> ColumnElement[bool]:
    return Job.status.in_(sorted(TERMINAL))


def _emptied() -> ColumnElement[bool]:
    marked: ColumnElement[bool] = Job.progress[jobstore.EMPTIED].as_string().is_not(None)
    return marked


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
    counts = jobstore.mark_deleted(session, tenant_id, job_id=job_id, batch_id=batch_id, now=now)
    scope = [Job.tenant_id == tenant_id, Job.deleted_at.is_not(None)]
    if batch_id is not None:
        scope.append(Job.batch_id == batch_id)
        mine = (Batch.id == batch_id, Batch.tenant_id == tenant_id, Batch.deleted_at.is_(None))
        session.execute(update(Batch).where(*mine).values(deleted_at=now))
    if job_id is not None:
        scope.append(Job.id == job_id)
    session.commit()
    _, ok = _empty(session, storage, scope, now, None)
    running = session.scalar(select(func.count()).select_from(Job).where(*scope, ~_terminal())) or 0
    return Deletion(counts, running, not ok)


def purge_once(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    now: datetime | None = None,
    *,
    scan_images: bool = True,
) -> PurgeReport:
    """One bounded pass (at most ``BATCH`` rows a step). ``scan_images`` also looks for unused
    uploads past retention (it reads the jobs table: a caller may do it every N passes only)."""
    now = now or utcnow()
    report = PurgeReport()
    with sessions() as session:
        report.canceled = jobstore.cancel_deleted(session, now)
        session.commit()
        report.emptied, _ = _empty(session, storage, [Job.deleted_at.is_not(None)], now, BATCH, report)
        if settings.retention_days > 0:
            old = [Job.deleted_at.is_(None), Job.finished_at < now - timedelta(days=settings.retention_days)]
            report.expired, _ = _empty(session, storage, old, now, BATCH, report)
    with sessions() as session:  # removed rows, then the images only they named: one transaction
        old = [Job.deleted_at < now - DELETED_GRACE, _terminal(), _emptied()]
        ids = list(session.scalars(select(Job.id).where(*old).order_by(Job.deleted_at).limit(BATCH)))
        released = jobstore.remove_emptied(session, ids)
        used = {(tenant, image) for tenant, images in released for image in images}
        if _drop_images(session, storage, {i for _, i in used}, used, settings, now, report):
            report.removed_jobs = len(released)
            empty = ~exists().where(Job.batch_id == Batch.id)
            report.removed_batches = _count(
                session.execute(delete(Batch).where(Batch.deleted_at.is_not(None), empty))
            )
            session.commit()
    if scan_images:
        with sessions() as session:
            _drop_images(session, storage, _unused(session, settings, now), set(), settings, now, report)
            session.commit()
    if report.emptied or report.expired or report.removed_jobs or report.removed_images or report.canceled:
        counts = {k: v if isinstance(v, int) else len(v) for k, v in vars(report).items()}
        logs.event(logger, "purged", kind="retention", counts=counts)
    return report


def _count(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)


def job_keys(job_id: str, attempt: int, params: Any, result: str | None, refs: Any) -> set[str]:
    """Every object a job may have: its result, each attempt's result, its checkpoints and previews."""
    fmt = str((params or {}).get("output_format") or "png")
    keys = {storage_keys.result_key(job_id, a, fmt) for a in range(1, attempt + 1)} | (
        {result} if result else set()
    )
    for ref in refs or []:
        keys.update(str(ref[f]) for f in ("key", "preview_key") if isinstance(ref, dict) and ref.get(f))
    return keys


def _empty(
    session: Session,
    storage: Storage,
    where: Sequence[ColumnElement[bool]],
    now: datetime,
    limit: int | None,
    report: PurgeReport | None = None,
) -> tuple[list[str], bool]:
    """Empty the finished jobs of ``where``: rows first (committed), then their objects. Returns
    their ids, and False if storage failed (the orphan sweep gets what is left)."""
    query = select(Job.id, Job.attempt, Job.params, Job.result_key, Job.checkpoints, Job.progress)
    rows = session.execute(query.where(*where, _terminal(), ~_emptied()).order_by(Job.id).limit(limit)).all()
    if not rows:
        return [], True
    jobstore.mark_emptied(session, [(r.id, r.progress) for r in rows], now)
    session.commit()
    keys = set().union(*(job_keys(r.id, r.attempt, r.params, r.result_key, r.checkpoints) for r in rows))
    try:
        _delete_keys(storage, sorted(keys), report)
    except StorageError as exc:
        logs.event(logger, "delete_failed", kind="retention", level=logging.WARNING, error=repr(exc))
        return [r.id for r in rows], False
    for row in rows:
        logs.event(logger, "emptied", kind="retention", job_id=row.id)
    return [r.id for r in rows], True


def _delete_keys(storage: Storage, keys: Sequence[str], report: PurgeReport | None) -> None:
    if isinstance(storage, Listing):
        storage.delete_many(keys)
    else:
        for key in keys:
            storage.delete(key)
    if report is not None:
        report.objects += len(keys)


def _unused(session: Session, settings: Settings, now: datetime) -> set[str]:
    """Up to ``BATCH`` images no ownership row protects, from a random point of the id space (so
    that images still named by jobs do not hide the others pass after pass)."""
    protecting = exists().where(TenantImage.image_id == StoredImage.id)
    if settings.retention_days > 0:
        uploads = max(timedelta(days=settings.retention_days), DELETED_GRACE)
        protecting = protecting.where(TenantImage.created_at >= now - uploads)
    query = select(StoredImage.id).where(StoredImage.created_at < now - DELETED_GRACE, ~protecting)
    start = secrets.token_hex(32)
    ids = list(session.scalars(query.where(StoredImage.id >= start).order_by(StoredImage.id).limit(BATCH)))
    ids += session.scalars(
        query.where(StoredImage.id < start).order_by(StoredImage.id).limit(BATCH - len(ids))
    )
    return set(ids)


def _drop_images(
    session: Session,
    storage: Storage,
    ids: set[str],
    used: set[tuple[str, str]],
    settings: Settings,
    now: datetime,
    report: PurgeReport,
) -> bool:
    """``used``: (tenant, image) named by rows removed in this transaction. A tenant's ownership of an
    image none of its jobs names any more is released; then an image no job names and no ownership
    protects (an unused upload) is deleted, its objects before the caller's commit. False (rolled
    back) if storage failed: the next pass tries again."""
    if not ids:
        return True
    locked = _lock_images(session, ids, now)
    named = _named(session, set(locked))
    released = {pair for pair in used if pair not in named and pair[1] in locked}
    owners = select(TenantImage.tenant_id, TenantImage.image_id, TenantImage.created_at)
    keep = {image for _, image in named}
    for tenant, image, at in session.execute(owners.where(TenantImage.image_id.in_(locked))).all():
        if (tenant, image) not in released and _protects(_aware(at, now), settings, now):
            keep.add(image)
    gone = sorted(set(locked) - keep)
    for tenant, image in sorted(released):
        mine = (TenantImage.tenant_id == tenant, TenantImage.image_id == image)
        session.execute(delete(TenantImage).where(*mine))
    if not gone:
        return True
    session.execute(delete(TenantImage).where(TenantImage.image_id.in_(gone)))
    session.execute(delete(StoredImage).where(StoredImage.id.in_(gone)))
    try:
        _delete_keys(storage, [locked[i] for i in gone], report)
    except StorageError as exc:
        session.rollback()
        logs.event(logger, "images_kept", kind="retention", level=logging.WARNING, error=repr(exc))
        return False
    report.removed_images += gone
    for image_id in gone:
        logs.event(logger, "image_deleted", kind="retention", image_id=image_id)
    return True


def _protects(at: datetime, settings: Settings, now: datetime) -> bool:
    """An ownership row no removed job released, made ``at``: an upload kept ``retention_days``."""
    return settings.retention_days <= 0 or at >= now - max(
        timedelta(days=settings.retention_days), DELETED_GRACE
    )


def _aware(at: datetime, now: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=now.tzinfo)  # SQLite: naive UTC


def _lock_images(session: Session, ids: set[str], now: datetime) -> dict[str, str]:
    """Lock the image rows (skipping those a live transaction holds): id → storage key, images
    younger than the grace left out. On SQLite a write takes the database lock first."""
    query = select(StoredImage.id, StoredImage.storage_key, StoredImage.created_at).where(
        StoredImage.id.in_(ids)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    else:
        same = update(StoredImage).where(StoredImage.id.in_(ids)).values(storage_key=StoredImage.storage_key)
        session.execute(same)
    rows = session.execute(query.order_by(StoredImage.id)).all()
    return {i: key for i, key, at in rows if _aware(at, now) < now - DELETED_GRACE}


def _named(session: Session, ids: set[str]) -> set[tuple[str, str]]:
    """(tenant, image) for each of ``ids`` some job row names, as content, style or mask."""
    if not ids:
        return set()
    query = select(Job.tenant_id, Job.content_image_id).where(Job.content_image_id.in_(ids))
    found = {(t, i) for t, i in session.execute(query.distinct())}
    pg = session.get_bind().dialect.name == "postgresql"
    for column in (Job.style_image_ids, Job.mask_image_ids):
        value = (func.json_array_elements_text if pg else func.json_each)(column).table_valued("value")
        query = select(Job.tenant_id, value.c.value).select_from(Job).join(value, true())
        found |= {(t, i) for t, i in session.execute(query.where(value.c.value.in_(ids)).distinct())}
    return found


__all__ = [
    "BATCH",
    "DELETED_GRACE",
    "Deletion",
    "PurgeReport",
    "delete_jobs",
    "job_keys",
    "purge_once",
    "result_expired",
]
