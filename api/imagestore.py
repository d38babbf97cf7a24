"""Uploaded images: validated first, stored once (content-addressed), owned per tenant.

Validation (``validate_uploads``, ``check_owned``) touches nothing; ``persist_images`` runs only after
the whole request has been validated, so a rejected request stores no object and creates no row.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shared import logs
from shared.errors import InvalidInput
from shared.imagecheck import ImageInfo, check_decodes, image_limits, read_header
from shared.models import StoredImage, TenantImage, utcnow
from shared.settings import Settings
from shared.storage import Storage
from shared.storage_keys import image_key

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PendingImage:
    id: str  # sha256 hex
    info: ImageInfo
    data: bytes

    @property
    def key(self) -> str:
        return image_key(self.id)


IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # sha256 hex: the only shape an image id can have


def is_image_id(value: str) -> bool:
    return IMAGE_ID.fullmatch(value) is not None


Raw = tuple[str, bytes] | str  # an upload as (form field, bytes), or an uploaded image's id
Item = PendingImage | str  # an inspected upload, or an image id


def resolve_items(items: Sequence[Raw], settings: Settings) -> list[Item]:
    """Inspect the uploads among ``items`` (see ``validate_uploads``); ids pass through."""
    pending = iter(validate_uploads([x for x in items if not isinstance(x, str)], settings))
    return [x if isinstance(x, str) else next(pending) for x in items]


def item_id(item: Item) -> str:
    return item if isinstance(item, str) else item.id


def image_dims(session: Session, tenant_id: str, items: Sequence[Item]) -> dict[str, tuple[int, int]]:
    """(width, height) of every item by id: uploads from their header, ids from the database
    (``unknown_image`` unless the tenant owns each)."""
    dims = check_owned(session, tenant_id, [i for i in items if isinstance(i, str)])
    dims.update({i.id: (i.info.width, i.info.height) for i in items if not isinstance(i, str)})
    return dims


def validate_uploads(uploads: Sequence[tuple[str, bytes]], settings: Settings) -> list[PendingImage]:
    """Inspect ``(field, bytes)`` uploads (no side effect; CPU-bound: call it in a worker thread).

    Every header is read first (cheap), so a request whose images add up to more than
    ``max_request_pixels`` is refused before any pixel is decoded; then each is decoded once and
    hashed. Error messages name the form field."""
    limits = image_limits(settings)  # the worker decodes the stored images with the same limits
    infos: list[ImageInfo] = [_named(field, read_header, data, **limits) for field, data in uploads]
    pixels = round(sum(i.decode_cost for i in infos))
    if pixels > settings.max_request_pixels:
        raise InvalidInput(
            "too_many_pixels",
            f"decoding the images of this request costs {pixels:,} pixels in all (progressive "
            f"JPEGs count once per 10 scans); the limit per request is "
            f"{settings.max_request_pixels:,}: send fewer or smaller images, or upload them with "
            "POST /v1/images first",
        )
    out = []
    for (field, data), info in zip(uploads, infos, strict=True):
        _named(field, check_decodes, data)
        out.append(PendingImage(hashlib.sha256(data).hexdigest(), info, data))
    return out


def _named(field: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, with the form field named in the message of an ``InvalidInput``."""
    try:
        return fn(*args, **kwargs)
    except InvalidInput as exc:
        exc.message = f"{field}: {exc.message}"
        raise


def check_owned(session: Session, tenant_id: str, image_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The (width, height) of each id; ``unknown_image`` unless the tenant has uploaded every id
    (others' ids, and strings that cannot be an image id, are unknown without a query)."""
    wanted = set(image_ids)
    if not wanted:
        return {}
    valid = {i for i in wanted if is_image_id(i)}
    found = (
        {
            row.id: (row.width, row.height)
            for row in session.execute(
                select(StoredImage.id, StoredImage.width, StoredImage.height)
                .join(TenantImage, TenantImage.image_id == StoredImage.id)
                .where(TenantImage.tenant_id == tenant_id, StoredImage.id.in_(valid))
                # PostgreSQL: FOR KEY SHARE until the submission commits, so retention's
                # FOR UPDATE SKIP LOCKED never deletes an image a submission is naming
                .with_for_update(key_share=True, of=StoredImage)
            )
        }
        if valid
        else {}
    )
    missing = sorted(wanted - set(found))
    if missing:
        raise InvalidInput(
            "unknown_image",
            f"unknown image id {missing[0][:80]!r}: upload it with POST /v1/images first",
            image_ids=[m[:80] for m in missing[:20]],
        )
    return found


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


def persist_images(
    session: Session, storage: Storage, tenant_id: str, images: Sequence[PendingImage]
) -> set[str]:
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
            {
                "id": img.id,
                "format": img.info.format,
                "width": img.info.width,
                "height": img.info.height,
                "bytes": len(img.data),
                "storage_key": img.key,
                "created_at": now,
            }
        )
    insert_ignore(session, StoredImage, new_rows)
    fresh = set(unique) - owned
    insert_ignore(
        session,
        TenantImage,
        [{"tenant_id": tenant_id, "image_id": i, "created_at": now} for i in sorted(fresh)],
    )
    for image_id in sorted(fresh):
        logs.event(logger, "owned", kind="image", image_id=image_id, tenant_id=tenant_id)
    return fresh


__all__ = [
    "Item",
    "PendingImage",
    "Raw",
    "check_owned",
    "image_dims",
    "insert_ignore",
    "is_image_id",
    "item_id",
    "persist_images",
    "resolve_items",
    "validate_uploads",
]
