"""The ``workers`` table: who may run jobs, on what, and whether it is alive. The only writer of its rows.

A Celery worker (one node: one GPU, or the CPU) registers when it starts (``worker.registry``):
``unhealthy`` with the remedy in ``detail`` when it cannot load its weights (it then exits, consuming
nothing), else ``starting`` and ``healthy`` once it consumes, with ``slots`` = its concurrency. It beats
every ``heartbeat_s``; a row silent for ``lease_s`` is *lost* (presumed dead), whatever its status.
On a warm shutdown it says ``stopping``, then removes its row. ``prune`` deletes rows dead for long.

``healthy_slots`` is what the dispatcher publishes against: a lost or unhealthy worker has no slots.
Times are UTC, written by the callers' clocks (as job heartbeats are).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ScalarSelect, delete, func, select, update
from sqlalchemy.orm import Session

from shared.jobs import JobStatus
from shared.models import Job, Worker, utcnow

logger = logging.getLogger(__name__)


class WorkerStatus(enum.StrEnum):
    #: Registered, weights checked, not consuming yet.
    STARTING = "starting"
    #: Consuming: its slots count.
    HEALTHY = "healthy"
    #: Cannot run jobs (``detail`` says why and what to do); it consumes nothing.
    UNHEALTHY = "unhealthy"
    #: Warm shutdown: finishing or handing back its jobs, taking no new ones.
    STOPPING = "stopping"


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def register(
    session: Session,
    *,
    node: str,
    host: str,
    device: str,
    weights: str,
    capabilities: dict[str, Any],
    slots: int,
    status: WorkerStatus | str,
    detail: str | None = None,
    now: datetime | None = None,
) -> Worker:
    """Insert or replace the row of ``node`` (a restarted worker starts afresh). The caller commits."""
    now = now or utcnow()
    row = session.get(Worker, node)
    if row is None:
        row = Worker(id=node)
        session.add(row)
    row.host, row.device, row.weights = host, device, weights
    row.capabilities = dict(capabilities)
    row.slots = max(0, int(slots))
    row.status = str(WorkerStatus(status))
    row.detail = detail
    row.started_at = row.heartbeat_at = now
    session.flush()
    return row


def beat(session: Session, node: str, *, now: datetime | None = None) -> bool:
    """The heartbeat: False when the row is gone (pruned, or never registered): register again."""
    result = session.execute(update(Worker).where(Worker.id == node).values(heartbeat_at=now or utcnow()))
    return bool(getattr(result, "rowcount", 0))


def set_status(
    session: Session,
    node: str,
    status: WorkerStatus | str,
    detail: str | None = None,
    *,
    only_from: tuple[WorkerStatus, ...] | None = None,
    now: datetime | None = None,
) -> bool:
    """Change the status (and ``detail``; also a heartbeat). ``only_from``: only from these statuses,
    so that a late "healthy" never overwrites an "unhealthy". False when no row changed."""
    stmt = update(Worker).where(Worker.id == node)
    if only_from is not None:
        stmt = stmt.where(Worker.status.in_([str(s) for s in only_from]))
    values = {"status": str(WorkerStatus(status)), "detail": detail, "heartbeat_at": now or utcnow()}
    result = session.execute(stmt.values(**values))
    return bool(getattr(result, "rowcount", 0))


def status_of(session: Session, node: str) -> WorkerStatus | None:
    """The row's status, or None without a row."""
    raw = session.scalar(select(Worker.status).where(Worker.id == node))
    return None if raw is None else WorkerStatus(raw)


def unregister(session: Session, node: str) -> bool:
    """Remove the row (a worker that stopped cleanly). False when there was none."""
    result = session.execute(delete(Worker).where(Worker.id == node))
    return bool(getattr(result, "rowcount", 0))


def slots_query(*, now: datetime, lease_s: float) -> ScalarSelect[Any]:
    """Slots of the healthy workers heard from within ``lease_s`` (a scalar subquery)."""
    cutoff = now - timedelta(seconds=lease_s)
    return (
        select(func.coalesce(func.sum(Worker.slots), 0))
        .where(Worker.status == str(WorkerStatus.HEALTHY), Worker.heartbeat_at >= cutoff)
        .scalar_subquery()
    )


def healthy_slots(session: Session, *, now: datetime, lease_s: float) -> int:
    """Slots of the healthy workers heard from within ``lease_s``: what the dispatcher fills."""
    return int(session.scalar(select(slots_query(now=now, lease_s=lease_s))) or 0)


def prune(session: Session, *, now: datetime, older_than: float) -> int:
    """Delete rows silent for ``older_than`` seconds (dead workers, refused ones long gone); the count."""
    cutoff = now - timedelta(seconds=older_than)
    result = session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class WorkerView:
    """One worker as an operator sees it. ``lost``: silent for ``lease_s`` (presumed dead)."""

    id: str
    host: str
    status: WorkerStatus
    lost: bool
    detail: str | None
    device: str
    weights: str
    capabilities: dict[str, Any]
    slots: int
    running: int  # running jobs it holds (``jobs.worker`` is ``node#pid``)
    heartbeat_age_s: float
    started_at: datetime


@dataclass(frozen=True)
class WorkersSummary:
    """Counts: ``healthy`` (slots count), ``unhealthy`` (refused or failed, whether or not still alive:
    the detail stays relevant until it registers again or is pruned), ``lost`` (any other status, silent
    for ``lease_s``), ``starting`` and ``stopping`` (alive). ``slots``: the healthy workers' slots."""

    healthy: int = 0
    unhealthy: int = 0
    lost: int = 0
    starting: int = 0
    stopping: int = 0
    slots: int = 0
    workers: list[WorkerView] = field(default_factory=list)

    @property
    def stale(self) -> int:
        return self.lost


def running_by_node(session: Session) -> Counter[str]:
    """Running jobs per worker node, from ``jobs.worker`` (``node@host#pid``)."""
    rows = session.execute(
        select(Job.worker, func.count())
        .where(Job.status == JobStatus.RUNNING, Job.worker.is_not(None))
        .group_by(Job.worker)
    ).all()
    out: Counter[str] = Counter()
    for holder, count in rows:
        out[str(holder).rsplit("#", 1)[0]] += int(count)
    return out


def _view(row: Worker, now: datetime, lease_s: float, running: int) -> WorkerView:
    age = max(0.0, (now - _aware(row.heartbeat_at)).total_seconds())
    return WorkerView(
        id=row.id,
        host=row.host,
        status=WorkerStatus(row.status),
        lost=age > lease_s,
        detail=row.detail,
        device=row.device,
        weights=row.weights,
        capabilities=dict(row.capabilities or {}),
        slots=row.slots,
        running=running,
        heartbeat_age_s=round(age, 3),
        started_at=_aware(row.started_at),
    )


def summary(session: Session, *, now: datetime, lease_s: float) -> WorkersSummary:
    """Every registered worker, classified as the summary's docstring says (two queries)."""
    running = running_by_node(session)
    views = [
        _view(row, now, lease_s, running.get(row.id.rsplit("#", 1)[0], 0))
        for row in session.scalars(select(Worker).order_by(Worker.id))
    ]
    counts: Counter[str] = Counter()
    slots = 0
    for view in views:
        if view.status is WorkerStatus.UNHEALTHY:
            counts["unhealthy"] += 1
        elif view.lost:
            counts["lost"] += 1
        else:
            counts[str(view.status)] += 1
            slots += view.slots if view.status is WorkerStatus.HEALTHY else 0
    return WorkersSummary(
        healthy=counts["healthy"],
        unhealthy=counts["unhealthy"],
        lost=counts["lost"],
        starting=counts["starting"],
        stopping=counts["stopping"],
        slots=slots,
        workers=views,
    )


__all__ = [
    "WorkerStatus",
    "WorkerView",
    "WorkersSummary",
    "beat",
    "healthy_slots",
    "prune",
    "register",
    "running_by_node",
    "slots_query",
    "set_status",
    "status_of",
    "summary",
    "unregister",
]
