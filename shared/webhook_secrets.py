"""Each tenant's webhook signing secret: made on first use, read and rotated by the tenant.

Secrets are Standard Webhooks secrets (``whsec_`` and base64 of 24 random bytes), the format the
``standardwebhooks`` libraries of every language accept. After a rotation the previous secret also
signs (a second signature in ``webhook-signature``) for ``key_rotate_overlap_s``, so receivers can
switch over without dropping a delivery.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Tenant, utcnow

PREFIX = "whsec_"


@dataclass(frozen=True)
class SigningSecrets:
    current: str
    previous: str | None = None
    previous_until: datetime | None = None

    def signing(self, now: datetime) -> list[str]:
        """The secrets that sign now: the current one, and the previous one during its overlap."""
        until = self.previous_until
        if until is not None and until.tzinfo is None:
            until = until.replace(tzinfo=now.tzinfo)
        live = self.previous is not None and until is not None and now < until
        return [self.current, *([self.previous] if live and self.previous else [])]


def make_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def get(session: Session, tenant_id: str) -> SigningSecrets:
    """The tenant's secrets, making the first one if it has none (the caller commits)."""
    row = session.execute(
        select(
            Tenant.webhook_secret, Tenant.webhook_secret_previous, Tenant.webhook_secret_previous_until
        ).where(Tenant.id == tenant_id)
    ).first()
    if row is None:
        raise NotFound("tenant_not_found", "no such tenant")
    current, previous, until = row
    if current:
        return SigningSecrets(current, previous, until)
    fresh = make_secret()
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
        .values(webhook_secret=fresh)
    )
    # a concurrent first use may have won: read what is stored
    stored = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    return SigningSecrets(stored or fresh)


def rotate(session: Session, tenant_id: str, overlap_s: float, now: datetime | None = None) -> SigningSecrets:
    """A new current secret; the old one signs too for ``overlap_s`` (the caller commits). One
    UPDATE: concurrent rotations each keep the secret the other made as their previous one."""
    now = now or utcnow()
    get(session, tenant_id)  # there is a current secret to keep as the previous one
    fresh = make_secret()
    until = now + timedelta(seconds=overlap_s)
    stmt = (
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(
            webhook_secret=fresh,
            webhook_secret_previous=Tenant.webhook_secret,
            webhook_secret_previous_until=until,
        )
        .returning(Tenant.webhook_secret_previous)
    )
    previous = session.execute(stmt, execution_options={"synchronize_session": False}).scalar_one()
    return SigningSecrets(fresh, previous, until)


__all__ = ["PREFIX", "SigningSecrets", "get", "make_secret", "rotate"]
