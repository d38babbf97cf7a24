"""The dispatcher process (``stylequeue dispatch``): every ``dispatch_interval_s`` one pass of

1. the reconciler (``shared.reconcile``): jobs of expired leases and of lost messages made waiting
   again, Idempotency-Keys past their retention pruned;
2. fair dispatch (``shared.dispatch``): waiting jobs published into free worker slots;
3. webhooks (``shared.webhook_outbox``): events due (new ones a process could not publish, retries
   whose time has come, those of a sender killed mid-attempt) published to the sender's queue, and
   settled events past retention removed;
4. retention (``shared.retention``): deleted jobs' and expired results' objects purged, unreferenced
   images removed, now and then an orphan sweep of storage; and long-dead worker rows pruned.

Several dispatchers may run at once (each step is guarded; dispatch passes are serialised on
PostgreSQL). A failing step is logged and the next pass tries again; it never stops the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from shared import dispatch, logs, reconcile, webhook_outbox, workers
from shared.dispatch import PublishMany
from shared.models import utcnow
from shared.settings import Settings

logger = logging.getLogger(__name__)

WORKER_ROWS_KEPT = timedelta(days=1)  # a worker silent this long is forgotten
WEBHOOK_EVENTS_KEPT_DAYS = 30.0  # settled webhook events, when retention_days is 0 (never)
WEBHOOK_PRUNE_EVERY_S = 600.0
_next_prune = [0.0]  # monotonic time of this process's next prune of settled webhook events


@dataclass
class PassReport:
    reconciled: reconcile.ReconcileReport
    dispatched: dispatch.DispatchReport


def one_pass(
    sessions: sessionmaker[Session],
    publish: PublishMany,
    settings: Settings,
    housekeeping: Callable[[datetime], None] | None = None,
    now: datetime | None = None,
    publish_webhooks: PublishMany | None = None,
) -> PassReport:
    """Reconcile, then dispatch, then publish due webhook events (with ``publish_webhooks``), then
    ``housekeeping`` (retention); each step's failure is logged and does not keep the others from
    running."""
    now = now or utcnow()
    reconciled = _step("reconcile", lambda: _reconcile(sessions, settings, now))
    dispatched = _step("dispatch", lambda: dispatch.dispatch_once(sessions, publish, settings, now=now))
    if publish_webhooks is not None:
        _step("webhooks", lambda: _webhooks(sessions, publish_webhooks, settings, now))
    _step("prune_workers", lambda: _prune_workers(sessions, now))
    if housekeeping is not None:
        _step("housekeeping", lambda: housekeeping(now))
    return PassReport(reconciled or reconcile.ReconcileReport(), dispatched or dispatch.DispatchReport())


T = TypeVar("T")


def _reconcile(
    sessions: sessionmaker[Session], settings: Settings, now: datetime
) -> reconcile.ReconcileReport:
    with sessions() as session:
        idle = dispatch.idle_slots(session, settings, now)
    return reconcile.reconcile_once(
        sessions,
        publish_grace_s=settings.publish_grace_s,
        lease_s=settings.lease_s,
        now=now,
        idle_slots=idle,
    )


def _step(name: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - logged with its traceback; the next pass tries again
        logs.event(
            logger,
            "pass_step_failed",
            kind="dispatcher",
            level=logging.ERROR,
            exc_info=True,
            step=name,
            error=type(exc).__name__,
        )
        return None


def _webhooks(
    sessions: sessionmaker[Session], publish: PublishMany, settings: Settings, now: datetime
) -> None:
    with sessions() as session:
        ids = webhook_outbox.due(session, now, settings.publish_grace_s)
        if time.monotonic() >= _next_prune[0]:  # settled events past retention, now and then
            days = settings.retention_days or WEBHOOK_EVENTS_KEPT_DAYS
            webhook_outbox.prune(session, now - timedelta(days=days))
            _next_prune[0] = time.monotonic() + WEBHOOK_PRUNE_EVERY_S
        session.commit()
    if ids:
        publish(ids)  # one not published now is published again after publish_grace_s


def _prune_workers(sessions: sessionmaker[Session], now: datetime) -> None:
    with sessions() as session:
        workers.prune(session, now=now, older_than=WORKER_ROWS_KEPT.total_seconds())
        session.commit()


def run_forever(
    sessions: sessionmaker[Session],
    publish: PublishMany,
    settings: Settings,
    *,
    housekeeping: Callable[[datetime], None] | None = None,
    interval_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    publish_webhooks: PublishMany | None = None,
    on_pass: Callable[[], None] | None = None,
) -> None:
    """A pass every ``interval_s`` (default ``dispatch_interval_s``) until ``stop()``; ``on_pass``
    after each (the health check's beat)."""
    interval = settings.dispatch_interval_s if interval_s is None else interval_s
    while not stop():
        r = one_pass(sessions, publish, settings, housekeeping, publish_webhooks=publish_webhooks).reconciled
        if r.lost or r.requeued or r.failed:
            logger.info(
                "reconcile lost=%d requeued=%d failed=%d",
                len(r.lost),
                len(r.requeued),
                len(r.failed),
            )
        if on_pass is not None:
            on_pass()
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.2, interval))


__all__ = ["PassReport", "one_pass", "run_forever"]
