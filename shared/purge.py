"""The retention pass: ``purge_once``, run by every dispatcher pass (``shared.orphans.Housekeeping``),
and the images it deletes. What it empties and removes, and when, is ``shared.retention``'s.

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
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, exists, func, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from shared import jobstore_deletion, logs
from shared.models import Batch, Job, StoredImage, TenantImage, utcnow
from shared.retention import (
    BATCH,
    DELETED_GRACE,
    PurgeReport,
    delete_keys,
    emptied,
    empty_jobs,
    terminal,
)
from shared.settings import Settings
from shared.storage import Storage, StorageError

logger = logging.getLogger("shared.retention")  # the pass's events keep the logger they always had


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
        report.canceled = jobstore_deletion.cancel_deleted(session, now)
        session.commit()
        report.emptied, _ = empty_jobs(session, storage, [Job.deleted_at.is_not(None)], now, BATCH, report)
        if settings.retention_days > 0:
            old = [Job.deleted_at.is_(None), Job.finished_at < now - timedelta(days=settings.retention_days)]
            report.expired, _ = empty_jobs(session, storage, old, now, BATCH, report)
    with sessions() as session:  # removed rows, then the images only they named: one transaction
        old = [Job.deleted_at < now - DELETED_GRACE, terminal(), emptied()]
        ids = list(session.scalars(select(Job.id).where(*old).order_by(Job.deleted_at).limit(BATCH)))
        released = jobstore_deletion.remove_emptied(session, ids)
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
        delete_keys(storage, [locked[i] for i in gone], report)
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


__all__ = ["purge_once"]
