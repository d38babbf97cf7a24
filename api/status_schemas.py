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


class ExecutionOut(BaseModel):
    """How the attempt that ended the job ran (set by the worker when it succeeds)."""

    device: str | None = Field(None, description="cpu, cuda:0, ...")
    precision: str | None = Field(None, description="the VGG pass's: float32, bfloat16, float16")
    weights: str | None = Field(None, description="where the VGG19 weights came from")
    random_weights: bool | None = Field(
        None, description="true: seeded random weights, not a real stylisation"
    )
    group_size: int | None = Field(None, description="jobs run together in one batch (1: alone)")
    engine_seconds: float | None = Field(None, description="the engine's run, whole group's when grouped")


__all__ = [
    "ExecutionOut",
    "JobCountsOut",
    "QueueOut",
    "StatusOut",
    "ThroughputOut",
    "UnhealthyWorkerOut",
    "WorkersOut",
]
