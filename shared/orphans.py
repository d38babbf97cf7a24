"""Storage objects no row names (orphans), and the dispatcher's housekeeping schedule.

Rows are written first and objects deleted after (``shared.retention``), so a failure or a crash
between the two leaves an object no row names, never a row naming nothing. ``sweep_orphans`` finds and
deletes such objects; ``Housekeeping`` is the retention step of each dispatcher pass: ``purge_once``
every pass (its scan for unused uploads every ``IMAGE_SCAN_EVERY`` passes) and a sweep every
``SWEEP_EVERY``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from itertools import islice

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import logs, purge, retention, storage_keys
from shared.models import Job, StoredImage, utcnow
from shared.settings import Settings
from shared.storage import Listing, Storage, StorageError

logger = logging.getLogger(__name__)

SWEEP_PAGE = 500  # listed objects checked against the rows per query
SWEEP_EVERY = timedelta(hours=1)
ORPHAN_AGE = timedelta(hours=6)  # older than any upload or result being committed
IMAGE_SCAN_EVERY = 30  # passes between scans for unused uploads past retention (a minute at 2 s)


def sweep_orphans(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    older_than: timedelta,
    now: datetime | None = None,
    limit: int = 1000,
) -> int:
    """Delete up to ``limit`` objects under the service's prefixes that no row names (an image row's
    ``storage_key``, a job's ``result_key``, checkpoint and preview keys, and the thumbnails of these)
    and last written before ``now - older_than`` (uploads and results being committed are younger).
    It lists every object: run it hourly or daily, not every pass. Returns how many were deleted."""
    if not isinstance(storage, Listing):
        raise StorageError(f"{type(storage).__name__} cannot list its objects")
    cutoff = (now or utcnow()) - older_than
    deleted = 0
    for prefix in storage_keys.PREFIXES:
        old = (o.key for o in storage.list_objects(prefix) if o.modified < cutoff)
        while deleted < limit and (page := list(islice(old, SWEEP_PAGE))):
            with sessions() as session:
                orphans = sorted(set(page) - _pointed_to(session, page))[: limit - deleted]
            if orphans:
                storage.delete_many(orphans)
                deleted += len(orphans)
                logs.event(logger, "orphans_deleted", kind="retention", count=len(orphans), first=orphans[0])
    return deleted


def _pointed_to(session: Session, keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` a row names."""
    images = [k for k in keys if k.startswith("images/")]
    found = set(session.scalars(select(StoredImage.storage_key).where(StoredImage.storage_key.in_(images))))
    job_ids = {j for j in map(storage_keys.job_of, keys) if j}
    rows = session.execute(select(Job.id, Job.result_key, Job.checkpoints).where(Job.id.in_(job_ids))).all()
    for job_id, result, refs in rows:
        found |= retention.job_keys(job_id, 0, None, result, refs)
    return found


class Housekeeping:
    """The retention step of every dispatcher pass (``shared.dispatcher``)."""

    def __init__(self, sessions: sessionmaker[Session], storage: Storage, settings: Settings) -> None:
        self.sessions, self.storage, self.settings = sessions, storage, settings
        self.passes = 0
        self.last_sweep: datetime | None = None

    def __call__(self, now: datetime) -> None:
        scan = self.passes % IMAGE_SCAN_EVERY == 0
        self.passes += 1
        purge.purge_once(self.sessions, self.storage, self.settings, now, scan_images=scan)
        if self.last_sweep is None or now - self.last_sweep >= SWEEP_EVERY:
            self.last_sweep = now
            sweep_orphans(self.sessions, self.storage, older_than=ORPHAN_AGE, now=now)


__all__ = ["ORPHAN_AGE", "SWEEP_EVERY", "Housekeeping", "sweep_orphans"]
