"""Response models of ``GET /v1/status`` and of a queued job's ``queue`` field (``JobOut.queue``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class QueueOut(BaseModel):
    position: int = Field(
        description="0-based: how many of your queued jobs are dispatched before this one (higher "
        "priority first, then submission order)"
    )
    eta_seconds: float | None = Field(
        description="about how long until it starts, from the last 15 minutes' throughput and your "
        "share of it; null when no job finished recently"
    )


class UnhealthyWorkerOut(BaseModel):
    status: str
    device: str
    weights: str
    detail: str | None = Field(description="why it cannot run jobs, and what to do")
    heartbeat_age_s: float


class WorkersOut(BaseModel):
    healthy: int = Field(description="workers taking jobs")
    unhealthy: int = Field(description="workers that refused to start or cannot run jobs (see below)")
    lost: int = Field(description="workers not heard from within the lease (presumed dead)")
    starting: int
    stopping: int
    slots: int = Field(description="jobs the healthy workers run at once")
    unhealthy_workers: list[UnhealthyWorkerOut]


class JobCountsOut(BaseModel):
    running: int
    queued: int


class ThroughputOut(BaseModel):
    window_s: int
    finished: int = Field(description="jobs a worker ran that finished within the window")
    per_minute: float


class StatusOut(BaseModel):
    workers: WorkersOut
    jobs: JobCountsOut = Field(description="all tenants")
    tenant: JobCountsOut = Field(description="your own jobs")
    throughput: ThroughputOut


__all__ = [
    "JobCountsOut",
    "QueueOut",
    "StatusOut",
    "ThroughputOut",
    "UnhealthyWorkerOut",
    "WorkersOut",
]
