"""Webhooks: the tenant's signing secret (read, rotate) and a job's delivery attempts.

``GET /v1/webhooks/secret`` makes the secret on first use. After ``POST /v1/webhooks/secret/rotate``
both the new and the previous secret sign every delivery until ``previous_valid_until``
(``STYLEQUEUE_KEY_ROTATE_OVERLAP_S``), so a receiver can switch without dropping one.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, TenantDep
from api.presenters import aware
from api.queries import get_job
from api.schemas import ERRORS
from shared import webhook_secrets
from shared.audit import audit
from shared.models import WebhookAttempt, WebhookEvent, utcnow

router = APIRouter(prefix="/v1", tags=["webhooks"])

MAX_ATTEMPTS_SHOWN = 200


class SecretOut(BaseModel):
    secret: str = Field(description="Standard Webhooks secret (whsec_...): verify webhook-signature with it")
    previous_valid_until: datetime | None = Field(
        None, description="after a rotation: until when the previous secret also signs"
    )


class AttemptOut(BaseModel):
    event_id: str = Field(description="the webhook-id header: the same on every attempt of an event")
    event: str
    state: str = Field(description="the event's: pending, delivered or failed")
    attempt: int
    status_code: int | None
    latency_ms: float | None
    error: str | None
    at: datetime


class AttemptList(BaseModel):
    items: list[AttemptOut]


def _secret_out(secrets: webhook_secrets.SigningSecrets) -> SecretOut:
    live = len(secrets.signing(utcnow())) > 1
    return SecretOut(
        secret=secrets.current, previous_valid_until=aware(secrets.previous_until) if live else None
    )


@router.get("/webhooks/secret", response_model=SecretOut, responses=ERRORS)
def read_secret(tenant: TenantDep, session: SessionDep) -> SecretOut:
    secrets = webhook_secrets.get(session, tenant.id)
    session.commit()  # a first read made it
    return _secret_out(secrets)


@router.post("/webhooks/secret/rotate", response_model=SecretOut, responses=ERRORS)
def rotate_secret(tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> SecretOut:
    secrets = webhook_secrets.rotate(session, tenant.id, settings.key_rotate_overlap_s)
    session.commit()
    audit("rotate_webhook_secret", tenant_id=tenant.id, key_prefix=tenant.key_prefix)
    return _secret_out(secrets)


@router.get("/jobs/{job_id}/webhooks", response_model=AttemptList, responses=ERRORS)
def job_webhook_attempts(
    job_id: str,
    tenant: TenantDep,
    session: SessionDep,
    limit: int = Query(50, ge=1, le=MAX_ATTEMPTS_SHOWN),
) -> AttemptList:
    """The job's delivery attempts, newest first."""
    get_job(session, tenant.id, job_id)  # 404 for another tenant's
    rows = session.execute(
        select(WebhookAttempt, WebhookEvent.event, WebhookEvent.state)
        .join(WebhookEvent, WebhookEvent.id == WebhookAttempt.event_id)
        .where(WebhookAttempt.job_id == job_id, WebhookEvent.tenant_id == tenant.id)
        .order_by(WebhookAttempt.id.desc())
        .limit(limit)
    ).all()
    return AttemptList(
        items=[
            AttemptOut(
                event_id=a.event_id,
                event=event,
                state=state,
                attempt=a.attempt,
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                error=a.error,
                at=aware(a.at) or a.at,
            )
            for a, event, state in rows
        ]
    )


__all__ = ["router"]
