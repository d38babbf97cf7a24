"""Uploaded images: validated first, stored once (content-addressed), owned per tenant.

Validation (``validate_upload``, ``check_owned``) touches nothing; ``persist_images`` runs only after
the whole request has been validated, so a rejected request stores no object and creates no row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.imagecheck import ImageInfo, inspect_image
from shared.models import StoredImage, TenantImage, utcnow
from shared.settings import Settings
from shared.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingImage:
    id: str  # sha256 hex
    info: ImageInfo
    data: bytes

    @property
    def key(self) -> str:
        return image_key(self.id)


def image_key(image_id: str) -> str:
    return f"images/{image_id}"


def validate_upload(data: bytes, settings: Settings, *, field: str = "file") -> PendingImage:
    """Inspect one upload (no side effect); the error message names the form field."""
    try:
        info = inspect_image(
            data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels
        )
    except InvalidInput as exc:
        exc.message = f"{field}: {exc.message}"
        raise
    return PendingImage(hashlib.sha256(data).hexdigest(), info, data)


def check_owned(session: Session, tenant_id: str, image_ids: Iterable[str]) -> None:
    """Raise ``unknown_image`` unless the tenant has uploaded every id (others' ids are unknown)."""
    wanted = set(image_ids)
    if not wanted:
        return
    found = set(
        session.scalars(
            select(TenantImage.image_id).where(
                TenantImage.tenant_id == tenant_id, TenantImage.image_id.in_(wanted)
            )
        )
    )
    missing = sorted(wanted - found)
    if missing:
        raise InvalidInput(
            "unknown_image",
            f"unknown image id {missing[0]!r}: upload it with POST /v1/images first",
            image_ids=missing[:20],
        )


def insert_ignore(session: Session, model: Any, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite (concurrent identical uploads)."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(model).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).on_conflict_do_nothing()
    else:  # pragma: no cover - other databases: plain insert
        stmt = insert(model)
    session.execute(stmt, list(rows))


def persist_images(session: Session, storage: Storage, tenant_id: str,
                   images: Sequence[PendingImage]) -> set[str]:
    """Store new objects, add image rows and ownership; return ids new to this tenant.

    The caller commits. An object already stored (same sha256) is not written again.
    """
    unique = {img.id: img for img in images}
    if not unique:
        return set()
    known = set(session.scalars(select(StoredImage.id).where(StoredImage.id.in_(unique))))
    owned = set(
        session.scalars(
            select(TenantImage.image_id).where(
                TenantImage.tenant_id == tenant_id, TenantImage.image_id.in_(unique)
            )
        )
    )
    now = utcnow()
    new_rows = []
    for img in unique.values():
        if img.id in known:
            continue
        if not storage.exists(img.key):
            storage.put_bytes(img.key, img.data, content_type=img.info.content_type)
        new_rows.append(
            {"id": img.id, "format": img.info.format, "width": img.info.width,
             "height": img.info.height, "bytes": len(img.data), "storage_key": img.key,
             "created_at": now}
        )
    insert_ignore(session, StoredImage, new_rows)
    fresh = set(unique) - owned
    insert_ignore(
        session,
        TenantImage,
        [{"tenant_id": tenant_id, "image_id": i, "created_at": now} for i in sorted(fresh)],
    )
    for image_id in sorted(fresh):
        logger.info("image_event job_id=- event=owned image_id=%s tenant_id=%s", image_id, tenant_id)
    return fresh


__all__ = ["PendingImage", "check_owned", "image_key", "insert_ignore", "persist_images",
           "validate_upload"]
