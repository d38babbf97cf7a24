"""``GET /v1/status``: the service as a tenant sees it (workers, queue depth, recent throughput).

Worker host names are not shown (they are another operator's machines); an unhealthy worker's device,
weights and ``detail`` (why, and what to do) are.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from fastapi import APIRouter
from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ERRORS
from api.status_schemas import JobCountsOut, StatusOut, ThroughputOut, UnhealthyWorkerOut, WorkersOut
from shared import workers
from shared.jobs import JobStatus
from shared.models import Job, utcnow
from shared.queue_position import finished_since, in_line
from shared.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["status"])

THROUGHPUT_WINDOW = timedelta(minutes=10)


def _workers_out(session: Session, settings: Settings, now: datetime) -> WorkersOut:
    found = workers.summary(session, now=now, lease_s=settings.lease_s)
    return WorkersOut(
        healthy=found.healthy,
        unhealthy=found.unhealthy,
        lost=found.lost,
        starting=found.starting,
        stopping=found.stopping,
        slots=found.slots,
        unhealthy_workers=[
            UnhealthyWorkerOut(
                status=str(w.status),
                device=w.device,
                weights=w.weights,
                detail=w.detail,
                heartbeat_age_s=w.heartbeat_age_s,
            )
            for w in found.workers
            if w.status is workers.WorkerStatus.UNHEALTHY
        ],
    )


def _job_counts(session: Session, tenant_id: str) -> tuple[JobCountsOut, JobCountsOut]:
    """(everyone's, the tenant's) running and queued (not deleted) jobs, in one query."""
    running = Job.status == JobStatus.RUNNING
    mine = Job.tenant_id == tenant_id

    def total(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    row = session.execute(
        select(
            total(running),
            total(in_line()),
            total(and_(running, mine)),
            total(and_(in_line(), mine)),
        ).where(Job.status.in_([JobStatus.RUNNING, JobStatus.QUEUED]))
    ).one()
    values = [int(v or 0) for v in row]
    return JobCountsOut(running=values[0], queued=values[1]), JobCountsOut(
        running=values[2], queued=values[3]
    )


def status_of(session: Session, settings: Settings, tenant_id: str, now: datetime) -> StatusOut:
    everyone, own = _job_counts(session, tenant_id)
    finished = finished_since(session, now - THROUGHPUT_WINDOW)
    window_s = int(THROUGHPUT_WINDOW.total_seconds())
    return StatusOut(
        workers=_workers_out(session, settings, now),
        jobs=everyone,
        tenant=own,
        throughput=ThroughputOut(
            window_s=window_s, finished=finished, per_minute=round(finished / (window_s / 60), 2)
        ),
    )


@router.get("/status", response_model=StatusOut, responses=ERRORS, summary="Workers, queue and throughput")
def read_status(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> StatusOut:
    """Healthy and unhealthy workers (with why), their slots, running and queued jobs (everyone's and
    yours), and the jobs finished in the last 10 minutes."""
    out = status_of(session, settings, tenant.id, utcnow())
    session.rollback()
    return out
