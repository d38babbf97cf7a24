"""``Idempotency-Key`` for POSTs: the same key with the same body returns the first response.

The key row is inserted in the same transaction as the jobs it answers for, so either both exist or
neither does. Two concurrent requests with one key race on the (tenant_id, key) unique constraint: the
loser rolls back everything it did and answers with the winner's stored response. The same key with a
different body is a 422. Keys are per tenant and kept ``RETENTION`` (at least 24 hours).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.models import IdempotencyKey, utcnow

logger = logging.getLogger(__name__)

RETENTION = timedelta(hours=48)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def fingerprint(parts: Iterable[bytes | str]) -> str:
    """A SHA-256 over the request's parts (form fields, file bytes), each length-prefixed."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise InvalidInput(
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            malformed=True,
        )
    return key


def lookup(
    session: Session, tenant_id: str, key: str, request_hash: str, *, drop_expired: bool = True
) -> StoredResponse | None:
    """The first response for this key, None if the key is new or expired (deleted then, unless
    ``drop_expired`` is False); 422 if it was used for another body."""
    row = session.execute(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)
    if created < utcnow() - RETENTION:
        if drop_expired:  # expired: the key may be used afresh
            session.delete(row)
            session.flush()
        return None
    if row.request_hash != request_hash:
        raise InvalidInput(
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new request",
        )
    return StoredResponse(row.status_code, dict(row.response))


def remember(session: Session, tenant_id: str, key: str, request_hash: str, response: StoredResponse) -> None:
    """Add the key row to the caller's transaction (committed together with the jobs), replacing
    an expired row of the same key in that transaction."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at < utcnow() - RETENTION,
        )
    )
    session.add(
        IdempotencyKey(
            tenant_id=tenant_id,
            key=key,
            request_hash=request_hash,
            status_code=response.status_code,
            response=response.body,
        )
    )


def prune(session: Session, now: datetime | None = None) -> int:
    """Delete keys past retention; returns how many. Run by the reconciler."""
    cutoff = (now or utcnow()) - RETENTION
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
