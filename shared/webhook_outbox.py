"""The webhook outbox's bookkeeping: which events are due, an attempt's lease, its record, pruning.

An event (``shared.webhooks`` writes it) is *pending* until an attempt gets a 2xx (*delivered*) or
its retry window ends (*failed*). Every attempt takes a lease first (one UPDATE guarded by the
state and the lease), so two messages for one event (a redelivery and a republish) never POST at
once, and a killed sender's event is taken again when its lease ends. Retries are scheduled here,
not by Celery's countdown: ``next_attempt_at`` is in the database, so a kill loses no retry, and the
dispatcher's pass publishes what is due (``due``). The id, and the payload frozen at the first
attempt, are the same on every attempt: receivers deduplicate on ``webhook-id``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from shared.models import WebhookAttempt, WebhookEvent, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STALE = "stale"  # what ``record`` says of an attempt a newer one overtook (its row is kept)
ERROR_MAX = 300  # characters of an attempt's error kept


@dataclass(frozen=True)
class Claimed:
    """An event whose attempt this caller now holds (its lease)."""

    id: str
    tenant_id: str
    job_id: str | None
    batch_id: str | None
    event: str
    url: str
    payload: str | None
    attempt: int  # this attempt's number, from 1
    created_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What one attempt gave: an HTTP status (None: no answer), its latency, an error in words."""

    status_code: int | None
    latency_ms: float
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, from ``base_s``, doubling up to ``max_s``, until ``window_s``
    after the event was written (then it fails)."""

    base_s: float
    max_s: float
    window_s: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """After attempt ``attempt`` (from 1): half the backoff plus a random half ("equal jitter":
        retries of many events spread out, and none comes back at once)."""
        full = min(self.max_s, self.base_s * 2 ** max(attempt - 1, 0))
        return float(full / 2 + (rng or random).uniform(0, full / 2))


def due(session: Session, now: datetime, grace_s: float, limit: int = 500) -> list[str]:
    """Pending events whose attempt is due, with no message sent for it within ``grace_s`` and no
    live lease: marked published now (a guarded UPDATE, so concurrent dispatchers split them) and
    returned, oldest due first, at most ``limit``."""
    cutoff = now - timedelta(seconds=grace_s)
    ready = (
        WebhookEvent.state == PENDING,
        WebhookEvent.next_attempt_at <= now,
        or_(WebhookEvent.published_at.is_(None), WebhookEvent.published_at < cutoff),
        or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until < now),
    )
    ids = list(
        session.scalars(
            select(WebhookEvent.id).where(*ready).order_by(WebhookEvent.next_attempt_at).limit(limit)
        )
    )
    if not ids:
        return []
    stmt = (
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(ids), *ready)
        .values(published_at=now)
        .returning(WebhookEvent.id)
    )
    marked = set(session.scalars(stmt, execution_options={"synchronize_session": False}))
    return [i for i in ids if i in marked]


def claim(session: Session, event_id: str, now: datetime, lease_s: float) -> Claimed | None:
    """Take the lease of a pending event's next attempt; None when it is delivered, failed, not due
    yet, or another attempt holds it."""
    stmt = (
        update(WebhookEvent)
        .where(
            WebhookEvent.id == event_id,
            WebhookEvent.state == PENDING,
            WebhookEvent.next_attempt_at <= now,
            or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until < now),
        )
        .values(lease_until=now + timedelta(seconds=lease_s), attempts=WebhookEvent.attempts + 1)
        .returning(
            WebhookEvent.id,
            WebhookEvent.tenant_id,
            WebhookEvent.job_id,
            WebhookEvent.batch_id,
            WebhookEvent.event,
            WebhookEvent.url,
            WebhookEvent.payload,
            WebhookEvent.attempts,
            WebhookEvent.created_at,
        )
    )
    row = session.execute(stmt, execution_options={"synchronize_session": False}).first()
    return None if row is None else Claimed(*row)


def freeze_payload(session: Session, event_id: str, payload: str) -> None:
    """The body of the first attempt, kept for every later one."""
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event_id, WebhookEvent.payload.is_(None))
        .values(payload=payload),
        execution_options={"synchronize_session": False},
    )


def record(
    session: Session,
    claimed: Claimed,
    outcome: Outcome,
    policy: RetryPolicy,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> str:
    """Record the attempt and settle the event: delivered, failed (its window is over) or pending
    with its next attempt scheduled. Returns the new state (``STALE``: a newer attempt holds it)."""
    now = now or utcnow()
    session.execute(
        insert(WebhookAttempt).values(
            event_id=claimed.id,
            job_id=claimed.job_id,
            attempt=claimed.attempt,
            status_code=outcome.status_code,
            latency_ms=round(outcome.latency_ms, 1),
            error=None if outcome.error is None else outcome.error[:ERROR_MAX],
            at=now,
        )
    )
    values: dict[str, Any] = {"lease_until": None, "published_at": None}
    created = claimed.created_at
    created = created if created.tzinfo else created.replace(tzinfo=now.tzinfo)
    next_at = now + timedelta(seconds=policy.delay(claimed.attempt, rng))
    if outcome.ok:
        values.update(state=DELIVERED, finished_at=now)
    elif next_at > created + timedelta(seconds=policy.window_s):
        values.update(state=FAILED, finished_at=now)
    else:
        values.update(next_attempt_at=next_at)
    # Only while this attempt is still the event's latest: one that outlived its lease (a newer
    # attempt claimed the event) must not clear the newer one's lease or schedule.
    stmt = update(WebhookEvent).where(
        WebhookEvent.id == claimed.id,
        WebhookEvent.attempts == claimed.attempt,
        WebhookEvent.state == PENDING,
    )
    done = session.execute(stmt.values(**values), execution_options={"synchronize_session": False})
    if not cast(CursorResult[Any], done).rowcount:
        return STALE
    return str(values.get("state", PENDING))


def defer(session: Session, claimed: Claimed, seconds: float, now: datetime | None = None) -> None:
    """Give a claimed attempt back unsent (its tenant has its share of the sender in flight): it is
    not counted, and is due again in ``seconds`` (the dispatcher's pass publishes it)."""
    now = now or utcnow()
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == claimed.id, WebhookEvent.state == PENDING)
        .values(
            lease_until=None,
            published_at=None,
            attempts=WebhookEvent.attempts - 1,
            next_attempt_at=now + timedelta(seconds=seconds),
        ),
        execution_options={"synchronize_session": False},
    )


def prune(session: Session, before: datetime, limit: int = 1000) -> int:
    """Delete settled events (and, by cascade, their attempts) finished before ``before``."""
    ids = list(
        session.scalars(
            select(WebhookEvent.id)
            .where(WebhookEvent.state != PENDING, WebhookEvent.finished_at < before)
            .limit(limit)
        )
    )
    if ids:
        session.execute(delete(WebhookAttempt).where(WebhookAttempt.event_id.in_(ids)))
        session.execute(delete(WebhookEvent).where(WebhookEvent.id.in_(ids)))
    return len(ids)


__all__ = [
    "DELIVERED",
    "FAILED",
    "PENDING",
    "Claimed",
    "Outcome",
    "RetryPolicy",
    "claim",
    "defer",
    "due",
    "freeze_payload",
    "prune",
    "record",
]
