"""Webhook events: which ones a job or batch asked for, and their emission into the outbox.

An event is a ``webhook_events`` row written in the SAME transaction as the change it reports (the
jobstore's status moves and checkpoint writes call in here), so a process that dies after the
commit loses nothing and one that dies before it emits nothing. Delivery is someone else's:
``shared.webhook_outbox`` (what is due, leases, attempts) and ``api.webhook_sender`` (the Celery task
that renders, signs and POSTs). Ids of events written by a session are kept in ``session.info`` so
a process that can publish does so right after its commit (``publish_after_commit``); the
dispatcher's pass publishes whatever is still due, so a lost publish only delays an event.

Events: ``start`` (a job's first attempt begins), ``checkpoint`` (a checkpoint was stored),
``completed`` (the job reached succeeded, failed or canceled) and, for batches, ``batch.completed``
(every job of the batch did). A job's default filter is ``completed``; a batch's is ``completed``
and ``batch.completed``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import event as sa_event
from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import TERMINAL, JobStatus
from shared.models import Batch, WebhookEvent, utcnow

logger = logging.getLogger(__name__)

START, CHECKPOINT, COMPLETED, BATCH_COMPLETED = "start", "checkpoint", "completed", "batch.completed"
JOB_EVENTS = (START, CHECKPOINT, COMPLETED)
BATCH_EVENTS = (*JOB_EVENTS, BATCH_COMPLETED)
DEFAULT_JOB_EVENTS = (COMPLETED,)
DEFAULT_BATCH_EVENTS = (COMPLETED, BATCH_COMPLETED)
_PENDING_KEY = "stylequeue.webhook_events"  # session.info: ids written, to publish after commit
_PUBLISHES_KEY = "stylequeue.publishes_webhooks"  # session.info: its commits publish (no re-send)


class Moved(NamedTuple):
    """A job row as a status move's RETURNING gives it: what emission needs."""

    id: str
    tenant_id: str
    batch_id: str | None
    webhook: str | None
    webhook_events: list[str] | None


def new_event_id() -> str:
    """``msg_`` and 32 hex digits: the Standard Webhooks ``webhook-id`` of every attempt."""
    return f"msg_{uuid.uuid4().hex}"


def event_of(new: JobStatus, values: dict[str, Any]) -> str | None:
    """The event a status move emits: ``completed`` into a terminal state, ``start`` for the claim
    that begins the first attempt (it sets ``started_at``); None for the rest (hand-backs, requeues)."""
    if new in TERMINAL:
        return COMPLETED
    if new == JobStatus.RUNNING and "started_at" in values:
        return START
    return None


def wants(events: Sequence[str] | None, name: str, batch: bool = False) -> bool:
    chosen = events if events is not None else (DEFAULT_BATCH_EVENTS if batch else DEFAULT_JOB_EVENTS)
    return name in chosen


def on_moved(session: Session, name: str, rows: Iterable[Moved]) -> None:
    """Emit ``name`` for every moved row that asked for it; for ``completed``, count the row's batch
    and emit ``batch.completed`` when it is the batch's last."""
    rows = [r for r in rows if r.webhook]
    events = [
        _row(r.tenant_id, r.webhook, name, job_id=r.id, batch_id=r.batch_id)
        for r in rows
        if r.webhook and wants(r.webhook_events, name)
    ]
    _insert(session, events)
    if name != COMPLETED:
        return
    per_batch: dict[str, int] = {}
    for r in rows:
        if r.batch_id is not None:
            per_batch[r.batch_id] = per_batch.get(r.batch_id, 0) + 1
    for batch_id, finished in sorted(per_batch.items()):
        _count_finished(session, batch_id, finished)


def on_checkpoint(session: Session, row: Moved) -> None:
    if row.webhook and wants(row.webhook_events, CHECKPOINT):
        _insert(session, [_row(row.tenant_id, row.webhook, CHECKPOINT, job_id=row.id, batch_id=row.batch_id)])


def _count_finished(session: Session, batch_id: str, finished: int) -> None:
    """One UPDATE ... RETURNING: the row lock orders concurrent finishers (PostgreSQL re-reads the
    counter a waiting UPDATE increments), so exactly one of them sees the total reach job_count."""
    stmt = (
        update(Batch)
        .where(Batch.id == batch_id, Batch.webhook.is_not(None))
        .values(finished_count=Batch.finished_count + finished)
        .returning(
            Batch.finished_count, Batch.job_count, Batch.tenant_id, Batch.webhook, Batch.webhook_events
        )
    )
    got = session.execute(stmt, execution_options={"synchronize_session": False}).first()
    if got is None:
        return
    count, total, tenant_id, url, events = got
    if count == total and url and wants(events, BATCH_COMPLETED, batch=True):
        _insert(session, [_row(tenant_id, url, BATCH_COMPLETED, batch_id=batch_id)])


def _row(
    tenant_id: str, url: str, name: str, *, job_id: str | None = None, batch_id: str | None = None
) -> dict[str, Any]:
    now = utcnow()  # published_at: set by _insert when the session's commit publishes
    return {
        "id": new_event_id(),
        "tenant_id": tenant_id,
        "job_id": job_id,
        "batch_id": batch_id,
        "event": name,
        "url": url,
        "payload": None,
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def _insert(session: Session, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if session.info.get(_PUBLISHES_KEY):  # the dispatcher leaves it for publish_grace_s
        rows = [{**r, "published_at": r["created_at"]} for r in rows]
    session.execute(insert(WebhookEvent), rows)
    session.info.setdefault(_PENDING_KEY, []).extend(r["id"] for r in rows)


def publish_after_commit(sessions: sessionmaker[Session], publish: Callable[[list[str]], object]) -> None:
    """Publish the events each committed session of ``sessions`` wrote (a rollback drops them).
    ``publish`` must not raise for a broker outage: the dispatcher's pass publishes what is due."""

    def _after_commit(session: Session) -> None:
        ids = session.info.pop(_PENDING_KEY, None)
        if ids:
            publish(list(ids))

    def _after_rollback(session: Session) -> None:
        session.info.pop(_PENDING_KEY, None)

    sessions.configure(info={**(sessions.kw.get("info") or {}), _PUBLISHES_KEY: True})
    sa_event.listen(sessions, "after_commit", _after_commit)
    sa_event.listen(sessions, "after_rollback", _after_rollback)


__all__ = [
    "BATCH_COMPLETED",
    "BATCH_EVENTS",
    "CHECKPOINT",
    "COMPLETED",
    "DEFAULT_BATCH_EVENTS",
    "DEFAULT_JOB_EVENTS",
    "JOB_EVENTS",
    "START",
    "Moved",
    "event_of",
    "new_event_id",
    "on_checkpoint",
    "on_moved",
    "publish_after_commit",
    "wants",
]
