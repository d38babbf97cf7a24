"""Fair dispatch: the database is the queue, the broker only a shallow delivery channel.

A job is inserted ``queued`` with ``published_at`` NULL: it is *waiting*, and only the database holds
it. A dispatch pass publishes waiting jobs while there is *room*::

    room = free slots (healthy workers' slots - running jobs)
         + dispatch_ahead x slots
         - messages out (published, not yet started)

so the broker never holds a backlog: with ``dispatch_ahead`` 0 a job is published when a slot is free
for it, and the choice of which job is made at that moment, not at submission. A message lost with
the broker is therefore noticed within ``publish_grace_s`` (``shared.reconcile``), and a tenant's
1,000 jobs sit in the table, not in front of everyone else's in a Redis list.

*Which* jobs: weighted fair queueing by attained service. A tenant is charged the cost
(``jobs.cost``: pixels x iterations) of its jobs in flight and of those started in the last
``FAIR_WINDOW``; each free slot goes to the waiting tenant with the least charge per unit of its
``weight`` (ties: the oldest waiting job), and its charge grows by the job's cost before the next
pick. Over a window this shares compute as deficit round-robin does, but it needs no per-dispatcher
state (the charges are read from the table), so several dispatchers agree on the order. Within a
tenant: ``priority`` (higher first), then submission order. A tenant at its ``max_running`` (override
or ``STYLEQUEUE_TENANT_MAX_RUNNING``) is skipped.

Passes run from the dispatcher loop (``stylequeue dispatch``), from the API right after a submission
commits (an idle system starts a job without waiting for the loop) and from a worker when its job
ends (its slot is refilled at once). On PostgreSQL a pass holds a transaction-scoped advisory lock,
so concurrent passes do not over-fill the room; the claim itself is a guarded UPDATE in any case, so
a job is never published twice by two passes.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Integer,
    Label,
    Select,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

from shared import jobstore_queue, logs, workers
from shared.jobs import JobStatus
from shared.models import Job, Tenant, Worker, utcnow
from shared.settings import Settings
from shared.workers import WorkerStatus

logger = logging.getLogger(__name__)

PublishMany = Callable[[Sequence[str]], list[str]]  # publishes in order; returns the ids sent
FAIR_WINDOW = timedelta(minutes=10)  # how long a started job still counts against its tenant
MAX_PER_PASS = 500  # jobs published by one pass at most, so a pass stays short
_LOCK_KEY = 0x5354594C  # "STYL": the advisory lock serialising passes on PostgreSQL


@dataclass
class DispatchReport:
    room: int = 0
    published: list[str] = field(default_factory=list)


@dataclass
class _Line:
    """One tenant's line as a pass sees it."""

    tenant_id: str
    oldest: datetime  # its oldest waiting job: the tie-break
    weight: int = 1
    charged: int = 0  # cost in flight or started within FAIR_WINDOW
    in_flight: int = 0  # running or published
    max_running: int = 0  # 0: no cap
    heads: list[tuple[str, int]] = field(default_factory=list)  # (id, cost), next first
    fetched: bool = False

    def key(self) -> tuple[float, datetime, str]:
        return (self.charged / max(1, self.weight), self.oldest, self.tenant_id)


def waiting() -> ColumnElement[bool]:
    """Queued, never published (or given back unpublished), not deleted: held by the database only."""
    return and_(Job.status == JobStatus.QUEUED, Job.published_at.is_(None), Job.deleted_at.is_(None))


def in_flight() -> ColumnElement[bool]:
    """Running, or published and not yet started (a message is out)."""
    return or_(
        Job.status == JobStatus.RUNNING, and_(Job.status == JobStatus.QUEUED, Job.published_at.is_not(None))
    )


def line_order() -> tuple[ColumnElement[int], ...]:
    """A tenant's line: higher priority first, then submission order (``shared.queue_position``)."""
    return (Job.priority.desc(), Job.created_at.asc(), Job.id.asc())  # type: ignore[return-value]


def slots_taken() -> Label[int]:
    """Slots in use (a scalar subquery): messages out (published, not started) plus the worker
    processes running jobs. A process counts once however many jobs it runs: a GPU worker running a
    group of 16 (worker.batch) holds one slot, as a CPU worker running one job does."""
    out = (
        select(func.count())
        .select_from(Job)
        .where(Job.status == JobStatus.QUEUED, Job.published_at.is_not(None))
    )
    running = select(func.count(func.distinct(Job.worker))).where(Job.status == JobStatus.RUNNING)
    return (out.scalar_subquery() + running.scalar_subquery()).label("taken")


def room(session: Session, settings: Settings, now: datetime) -> int:
    """How many more messages the broker may hold now (one query)."""
    row = session.execute(select(workers.slots_query(now=now, lease_s=settings.lease_s), slots_taken())).one()
    return _room(settings, row[0], row[1])


def _room(settings: Settings, slots: int | None, flying: int | None) -> int:
    total = int(slots or 0) * (1 + max(0, settings.dispatch_ahead))
    return max(0, min(MAX_PER_PASS, total - int(flying or 0)))


def idle_slots(session: Session, settings: Settings, now: datetime) -> int:
    """Healthy slots running no job: with a message out older than a few seconds, proof of its loss."""
    slots = workers.healthy_slots(session, now=now, lease_s=settings.lease_s)
    running = select(func.count(func.distinct(Job.worker))).where(Job.status == JobStatus.RUNNING)
    return max(0, slots - (session.scalar(running) or 0))


def dispatch_once(
    sessions: sessionmaker[Session],
    publish: PublishMany,
    settings: Settings,
    now: datetime | None = None,
    *,
    wait: bool = True,
) -> DispatchReport:
    """One pass: claim the next jobs in fair order (``published_at`` := now), commit, publish them;
    a job the broker did not take is given back (``published_at`` NULL again). ``wait=False`` (an
    idle worker asking for work): skip the pass if another one is running (it does the same)."""
    now = now or utcnow()
    report = DispatchReport()
    with sessions() as session:
        if not _serialise(session, wait):
            return report
        report.room, lines = _survey(session, settings, now)
        picks = _pick(session, lines, report.room) if report.room else []
        claimed = jobstore_queue.claim_dispatch(session, picks, now)
        session.commit()
    if not claimed:
        return report
    sent = publish(claimed)
    report.published = list(sent)
    missed = [job_id for job_id in claimed if job_id not in set(sent)]
    if missed:
        with sessions() as session:
            jobstore_queue.unclaim_dispatch(session, missed, now)
            session.commit()
    logs.event(logger, "dispatched", job_id=claimed[0], jobs=len(sent), room=report.room, missed=len(missed))
    return report


def _serialise(session: Session, wait: bool) -> bool:
    """One pass at a time (PostgreSQL; until this transaction ends); False: another holds it."""
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite serialises the writers; a few extra messages at worst
    if wait:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _LOCK_KEY}))


class Among(NamedTuple):
    """The waiting jobs a GPU group may take: of one bucket (``shared.buckets``) that start at one
    scale (``jobs.resume_scale``: fresh ones at 0, a resumed one where its checkpoint left it)."""

    bucket: str
    resume_scale: int = 0


def fair_picks(
    session: Session, count: int, settings: Settings, now: datetime, *, among: Among | None = None
) -> list[str]:
    """The next ``count`` waiting jobs in fair order (see the module docstring); with ``among``,
    of that bucket and resume scale only (a GPU worker filling its group, worker.batch)."""
    return _pick(session, _survey(session, settings, now, among)[1], count, among)


def _pick(session: Session, lines: dict[str, _Line], count: int, among: Among | None = None) -> list[str]:
    heap = [(line.key(), line.tenant_id) for line in lines.values()]
    heapq.heapify(heap)
    picks: list[str] = []
    while heap and len(picks) < count:
        _, tenant_id = heapq.heappop(heap)
        line = lines[tenant_id]
        if line.max_running and line.in_flight >= line.max_running:
            continue  # at its cap: the rest of this pass goes to the others
        if not line.fetched:
            line.heads = _heads(session, tenant_id, count, among)
            line.fetched = True
        if not line.heads:
            continue
        job_id, cost = line.heads.pop(0)
        picks.append(job_id)
        line.charged += max(1, cost)
        line.in_flight += 1
        if line.heads:
            heapq.heappush(heap, (line.key(), tenant_id))
    return picks


def _waiting_in(bucketed: bool) -> ColumnElement[bool]:
    """Waiting jobs; ``bucketed``: of one bucket that start at one scale (``Among``'s parameters)."""
    if not bucketed:
        return waiting()
    return and_(waiting(), Job.bucket == bindparam("bucket"), Job.resume_scale == bindparam("resume_scale"))


@cache
def _survey_query(bucketed: bool = False) -> Select[Any]:
    """Each waiting tenant's line with its charges, and the room, in ONE round trip (a pass on an
    idle system is on the path from submission to start). Built once: the times are parameters.
    The room's two counts are uncorrelated scalar subqueries, evaluated once, not per row."""
    flying = case((in_flight(), 1), else_=0)
    charged = (
        select(Job.tenant_id, func.sum(Job.cost).label("cost"), func.sum(flying).label("flying"))
        .where(or_(in_flight(), Job.started_at >= bindparam("window_start", type_=Job.started_at.type)))
        .group_by(Job.tenant_id)
        .subquery()
    )
    slots = (
        select(func.coalesce(func.sum(Worker.slots), 0))
        .where(
            Worker.status == str(WorkerStatus.HEALTHY),
            Worker.heartbeat_at >= bindparam("heard_since", type_=Worker.heartbeat_at.type),
        )
        .scalar_subquery()
    )
    return (
        select(
            Job.tenant_id,
            func.min(Job.created_at),
            Tenant.weight,
            Tenant.max_running,
            func.coalesce(charged.c.cost, 0),
            func.coalesce(charged.c.flying, 0),
            slots,
            slots_taken(),
        )
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(charged, charged.c.tenant_id == Job.tenant_id)
        .where(_waiting_in(bucketed))
        .group_by(Job.tenant_id, Tenant.weight, Tenant.max_running, charged.c.cost, charged.c.flying)
    )


def _survey(
    session: Session, settings: Settings, now: datetime, among: Among | None = None
) -> tuple[int, dict[str, _Line]]:
    """The room, and the waiting tenants' lines (none waiting: room 0, nothing to fill it with)."""
    params: dict[str, Any] = {
        "window_start": now - FAIR_WINDOW,
        "heard_since": now - timedelta(seconds=settings.lease_s),
    }
    if among is not None:
        params.update(among._asdict())
    rows = session.execute(_survey_query(among is not None), params).all()
    if not rows:
        return 0, {}
    lines = {
        tenant_id: _Line(
            tenant_id,
            oldest,
            weight=max(1, weight or 1),
            charged=int(cost),
            in_flight=int(flying),
            max_running=settings.tenant_max_running if max_running is None else max_running,
        )
        for tenant_id, oldest, weight, max_running, cost, flying, _, _ in rows
    }
    return _room(settings, rows[0][6], rows[0][7]), lines


@cache
def _heads_query(bucketed: bool = False) -> Select[str, int]:
    return (
        select(Job.id, Job.cost)
        .where(_waiting_in(bucketed), Job.tenant_id == bindparam("tenant_id"))
        .order_by(*line_order())
        .limit(bindparam("limit", type_=Integer))
    )


def _heads(session: Session, tenant_id: str, limit: int, among: Among | None = None) -> list[tuple[str, int]]:
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit}
    if among is not None:
        params.update(among._asdict())
    rows = session.execute(_heads_query(among is not None), params).all()
    return [(job_id, int(cost)) for job_id, cost in rows]


__all__ = [
    "FAIR_WINDOW",
    "Among",
    "DispatchReport",
    "PublishMany",
    "dispatch_once",
    "fair_picks",
    "idle_slots",
    "in_flight",
    "line_order",
    "room",
    "waiting",
]
