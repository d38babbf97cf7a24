"""Tenants and their API keys: creation, listing, revocation, rotation, and authentication.

A key is shown once at creation and stored only as its sha256; its first ``PREFIX_LEN`` characters
(``prefix``) name it in listings, logs and the ``keys revoke``/``keys rotate`` commands, so a new
key gets a prefix no other key has. A key may carry ``expires_at`` (``keys create --expires-in``, or
the overlap after ``keys rotate``); ``last_used_at`` is written at most once per ``TOUCH_EVERY``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shared import logs
from shared.errors import Conflict, InvalidInput, NotFound, Unauthorized
from shared.models import ApiKey, Tenant, utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "sq_"
PREFIX_LEN = 10  # "sq_" + 7 characters: 42 of the key's 256 bits, enough to tell keys apart
LOCAL_TENANT = "local"  # the implicit tenant when STYLEQUEUE_AUTH=off
TOUCH_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per key


@dataclass(frozen=True)
class NewKey:
    tenant_id: str
    tenant_name: str
    key: str  # the secret: print once, never stored
    prefix: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``keys list`` shows it (never the secret)."""

    prefix: str
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime | None = None) -> str:
        """active | expired | revoked"""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and aware(self.expires_at) <= (now or utcnow()):
            return "expired"
        return "active"


@dataclass(frozen=True)
class AuthKey:
    """Who a request is: the tenant, and which of its keys (``prefix`` goes to the audit log)."""

    tenant: Tenant
    key_id: str
    prefix: str


def aware(value: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite returns them naive, in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        logs.event(logger, "created", kind="tenant", tenant_id=tenant.id, name=name)
    return tenant


def find_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(
            "unknown_tenant", f"no tenant named {name!r} (`stylequeue keys create --tenant` makes one)"
        )
    return tenant


def _new_secret(session: Session) -> tuple[str, str]:
    """A fresh key whose prefix no stored key has (a collision is ~2^-42 per pair: retry)."""
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = key[:PREFIX_LEN]
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix).limit(1)) is None:
            return key, prefix


def _add_key(session: Session, tenant: Tenant, expires_in: timedelta | None) -> NewKey:
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidInput("invalid_expiry", "the expiry must be in the future (a positive number of days)")
    key, prefix = _new_secret(session)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=prefix, expires_at=expires_at))
    session.flush()
    logs.event(
        logger, "key_created", kind="tenant", tenant_id=tenant.id, prefix=prefix, expires_at=expires_at
    )
    return NewKey(tenant.id, tenant.name, key, prefix, expires_at)


def create_key(session: Session, tenant_name: str, *, expires_in: timedelta | None = None) -> NewKey:
    """Create the tenant if needed and a new API key for it (expiring after ``expires_in``, if
    given); the caller commits."""
    return _add_key(session, get_or_create_tenant(session, tenant_name), expires_in)


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    """Every key (of one tenant), oldest first."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        query = query.where(Tenant.id == find_tenant(session, tenant_name).id)
    rows = session.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [_info(key, name) for key, name in rows]


def _info(key: ApiKey, tenant_name: str) -> KeyInfo:
    return KeyInfo(key.prefix, tenant_name, key.created_at, key.last_used_at, key.expires_at, key.revoked_at)


def find_key(session: Session, prefix: str, tenant_name: str | None = None) -> tuple[ApiKey, str]:
    """The one key with this prefix (of this tenant), and its tenant's name; NotFound or, when the
    prefix names several keys, Conflict (``ambiguous_key_prefix``)."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    query = query.where(ApiKey.prefix == prefix.strip())
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    rows = session.execute(query.order_by(ApiKey.created_at)).all()
    if not rows:
        owner = f" of tenant {tenant_name!r}" if tenant_name is not None else ""
        raise NotFound(
            "unknown_key_prefix", f"no key{owner} has the prefix {prefix!r} (see `stylequeue keys list`)"
        )
    if len(rows) > 1:
        tenants = ", ".join(sorted({name for _, name in rows}))
        raise Conflict(
            "ambiguous_key_prefix",
            f"{len(rows)} keys have the prefix {prefix!r} (tenants: {tenants}); nothing was changed: "
            "add --tenant to choose one, or revoke them all one tenant at a time",
        )
    key, name = rows[0]
    return key, name


def revoke_key(session: Session, prefix: str, tenant_name: str | None = None) -> KeyInfo:
    """Revoke the key at once (an already revoked key keeps its first revocation time)."""
    key, name = find_key(session, prefix, tenant_name)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
        logs.event(logger, "key_revoked", kind="tenant", tenant_id=key.tenant_id, prefix=key.prefix)
    return _info(key, name)


def rotate_key(
    session: Session,
    prefix: str,
    overlap: timedelta,
    *,
    tenant_name: str | None = None,
    expires_in: timedelta | None = None,
) -> tuple[NewKey, KeyInfo]:
    """A new key for the same tenant; the old one keeps working until now + ``overlap`` (or its own
    earlier expiry). A revoked or expired key is not rotated: create a new one."""
    if overlap < timedelta(0):
        raise InvalidInput("invalid_overlap", "the overlap must be zero or more seconds")
    old, name = find_key(session, prefix, tenant_name)
    now = utcnow()
    state = _info(old, name).state(now)
    if state != "active":
        raise Conflict("key_not_active", f"the key {old.prefix} is {state}: create a new key instead")
    tenant = session.get(Tenant, old.tenant_id)
    assert tenant is not None  # the foreign key
    new = _add_key(session, tenant, expires_in)
    until = now + overlap
    old.expires_at = min(aware(old.expires_at), until) if old.expires_at is not None else until
    session.flush()
    logs.event(
        logger, "key_rotated", kind="tenant", tenant_id=tenant.id, prefix=old.prefix, new_prefix=new.prefix
    )
    return new, _info(old, name)


def authenticate(session: Session, key: str | None) -> AuthKey:
    """The tenant and key owning ``key``; ``Unauthorized`` when missing, unknown, revoked or expired.
    Writes ``last_used_at`` when it is older than ``TOUCH_EVERY`` (the caller commits)."""
    if not key:
        raise Unauthorized("missing_api_key", "send your API key as 'Authorization: Bearer KEY'")
    row = session.execute(
        select(Tenant, ApiKey.id, ApiKey.prefix, ApiKey.revoked_at, ApiKey.expires_at, ApiKey.last_used_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key))
    ).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid_api_key", "the API key is unknown or revoked")
    now = utcnow()
    if row.expires_at is not None and aware(row.expires_at) <= now:
        raise Unauthorized(
            "expired_api_key",
            f"the API key {row.prefix} expired at {aware(row.expires_at):%Y-%m-%d %H:%M:%S} UTC: "
            "use its replacement, or ask for a new key",
        )
    if row.last_used_at is None or aware(row.last_used_at) <= now - TOUCH_EVERY:
        _touch(session, row.id, now)
    return AuthKey(row.Tenant, row.id, row.prefix)


def _touch(session: Session, key_id: str, now: datetime) -> None:
    """``last_used_at = now`` unless another request did it within ``TOUCH_EVERY``."""
    cutoff = now - TOUCH_EVERY
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= cutoff))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )


__all__ = [
    "KEY_PREFIX",
    "LOCAL_TENANT",
    "PREFIX_LEN",
    "AuthKey",
    "KeyInfo",
    "NewKey",
    "authenticate",
    "aware",
    "create_key",
    "find_key",
    "find_tenant",
    "get_or_create_tenant",
    "hash_key",
    "list_keys",
    "revoke_key",
    "rotate_key",
]
