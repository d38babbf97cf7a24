"""Tenants and their API keys. A key is shown once at creation and stored only as its sha256."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import logs
from shared.errors import Unauthorized
from shared.models import ApiKey, Tenant

logger = logging.getLogger(__name__)

KEY_PREFIX = "sq_"
LOCAL_TENANT = "local"  # the implicit tenant when STYLEQUEUE_AUTH=off


@dataclass(frozen=True)
class NewKey:
    tenant_id: str
    tenant_name: str
    key: str  # the secret: print once, never stored
    prefix: str


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


def create_key(session: Session, tenant_name: str) -> NewKey:
    """Create the tenant if needed and a new API key for it; the caller commits."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    prefix = key[:10]
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=prefix))
    session.flush()
    logs.event(logger, "key_created", kind="tenant", tenant_id=tenant.id, prefix=prefix)
    return NewKey(tenant_id=tenant.id, tenant_name=tenant.name, key=key, prefix=prefix)


def authenticate(session: Session, key: str | None) -> Tenant:
    """The tenant owning ``key``; ``Unauthorized`` when missing, unknown or revoked."""
    if not key:
        raise Unauthorized("missing_api_key", "send your API key as 'Authorization: Bearer KEY'")
    row = session.execute(
        select(Tenant, ApiKey.revoked_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key))
    ).first()
    if row is None or row[1] is not None:
        raise Unauthorized("invalid_api_key", "the API key is unknown or revoked")
    tenant: Tenant = row[0]
    return tenant


__all__ = ["LOCAL_TENANT", "NewKey", "authenticate", "create_key", "get_or_create_tenant", "hash_key"]
