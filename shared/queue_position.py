"""Where a queued job stands in its tenant's line, and about when it may start.

A tenant's line is its queued, not deleted jobs in dispatch order: higher ``priority`` first, then
submission order (``created_at``, ``id``), exactly as ``shared.dispatch`` picks them. The position is
0-based: 0 is the job the tenant's next free slot goes to.

Dispatch is fair across tenants (weighted by ``tenants.weight``), so a tenant's line moves at its share
of the recent throughput: the jobs that finished in the last ``ETA_WINDOW`` (any tenant's) per second,
times its weight over the weights of the tenants that now have queued or running jobs. The estimate
(``eta_seconds``: until the job starts) is None when nothing finished recently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from shared.jobs import TERMINAL, JobStatus
from shared.models import Job, Tenant

logger = logging.getLogger(__name__)

ETA_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class QueueSpot:
    position: int
    eta_seconds: float | None


def in_line() -> ColumnElement[bool]:
    """Queued and not deleted: the jobs of a line."""
    return and_(Job.status == JobStatus.QUEUED, Job.deleted_at.is_(None))


def _ahead_of(job: Job) -> ColumnElement[bool]:
    """Before ``job`` in ORDER BY priority DESC, created_at ASC, id ASC."""
    same = Job.priority == job.priority
    return or_(
        Job.priority > job.priority,
        and_(same, Job.created_at < job.created_at),
        and_(same, Job.created_at == job.created_at, Job.id < job.id),
    )


def position(session: Session, job: Job) -> int:
    """How many of the tenant's queued, not deleted jobs are ahead of ``job`` (one count)."""
    count = session.scalar(
        select(func.count()).select_from(Job).where(in_line(), Job.tenant_id == job.tenant_id, _ahead_of(job))
    )
    return int(count or 0)


def positions(session: Session, tenant_id: str, job_ids: Iterable[str]) -> dict[str, int]:
    """Positions of those of ``job_ids`` that are in the tenant's line (one query, for a page)."""
    wanted = list(dict.fromkeys(job_ids))
    if not wanted:
        return {}
    rank = func.row_number().over(order_by=(Job.priority.desc(), Job.created_at.asc(), Job.id.asc()))
    line = (
        select(Job.id.label("id"), rank.label("rank")).where(in_line(), Job.tenant_id == tenant_id).subquery()
    )
    rows = session.execute(select(line.c.id, line.c.rank).where(line.c.id.in_(wanted))).all()
    return {str(job_id): int(rank) - 1 for job_id, rank in rows}


def finished_since(session: Session, since: datetime) -> int:
    """Jobs a worker ran (``started_at`` set) that finished at or after ``since``, any tenant's.

    ``updated_at >= since`` is implied (a job's last update is its finish or later) and lets the
    ``(status, updated_at)`` index find them without reading every finished job of the retention."""
    count = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status.in_(list(TERMINAL)),
            Job.updated_at >= since,
            Job.started_at.is_not(None),
            Job.finished_at >= since,
        )
    )
    return int(count or 0)


def tenant_rate(session: Session, tenant_id: str, now: datetime) -> float | None:
    """Jobs per second the tenant's line may expect to start (see the module docstring), or None."""
    finished = finished_since(session, now - ETA_WINDOW)
    if not finished:
        return None
    active = select(Job.tenant_id).where(
        or_(in_line(), Job.status == JobStatus.RUNNING), Job.tenant_id != tenant_id
    )
    others = session.scalar(
        select(func.coalesce(func.sum(Tenant.weight), 0)).where(Tenant.id.in_(active.distinct()))
    )
    mine = session.scalar(select(Tenant.weight).where(Tenant.id == tenant_id))
    weight = max(1, int(mine or 1))
    share = weight / (weight + max(0, int(others or 0)))
    return finished / ETA_WINDOW.total_seconds() * share


def eta_from_rate(position: int, rate: float | None) -> float | None:
    """Seconds until the job at ``position`` starts, at ``rate`` jobs per second (None: unknown)."""
    if not rate or rate <= 0:
        return None
    return round((position + 1) / rate, 1)


def eta_seconds(session: Session, tenant_id: str, position: int, now: datetime) -> float | None:
    """About how many seconds until the tenant's job at ``position`` starts; None without throughput."""
    return eta_from_rate(position, tenant_rate(session, tenant_id, now))


def spots(session: Session, tenant_id: str, jobs: Sequence[Job], now: datetime) -> dict[str, QueueSpot]:
    """Position and ETA of each queued, not deleted job of ``jobs`` (the tenant's), in a few queries
    however many jobs: the positions (one count for one job, one ranking for a page), then the rate
    (three); none without a queued job."""
    queued = [j for j in jobs if j.status == JobStatus.QUEUED and j.deleted_at is None]
    if not queued:
        return {}
    if len(queued) == 1:
        found = {queued[0].id: position(session, queued[0])}
    else:
        found = positions(session, tenant_id, [j.id for j in queued])
    rate = tenant_rate(session, tenant_id, now) if found else None
    return {job_id: QueueSpot(pos, eta_from_rate(pos, rate)) for job_id, pos in found.items()}


__all__ = [
    "ETA_WINDOW",
    "QueueSpot",
    "eta_from_rate",
    "eta_seconds",
    "finished_since",
    "in_line",
    "position",
    "positions",
    "spots",
    "tenant_rate",
]
