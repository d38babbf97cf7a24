"""Response (and JSON request) models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageOut(BaseModel):
    id: str = Field(description="sha256 of the bytes")
    format: str
    width: int
    height: int
    bytes: int


class Progress(BaseModel):
    scale: int | None = None
    scales: int | None = None
    iteration: int | None = None
    iterations: int | None = None
    fraction: float = 0.0
    loss: float | None = None
    eta_seconds: float | None = None


class JobErrorOut(BaseModel):
    code: str
    message: str
    retryable: bool | None = None


class CheckpointOut(BaseModel):
    scale: int | None = None
    iteration: int | None = None
    step: int | None = None
    url: str | None = None
    preview_url: str | None = None


class JobOut(BaseModel):
    id: str
    status: str
    batch_id: str | None
    content_id: str
    style_ids: list[str]
    params: dict[str, Any]
    progress: Progress
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorOut | None
    result_url: str | None
    checkpoints: list[CheckpointOut]


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class BatchCreated(BaseModel):
    id: str
    job_count: int
    job_ids: list[str]


class BatchOut(BaseModel):
    id: str
    job_count: int
    counts: dict[str, int]
    progress: float = Field(description="overall fraction done, finished jobs counting as 1")
    done: bool
    params: dict[str, Any]
    created_at: datetime
    job_ids: list[str]


class BatchRequest(BaseModel):
    """JSON body of ``POST /v1/batches`` naming uploaded image ids."""

    model_config = ConfigDict(extra="forbid")

    contents: list[str] = Field(min_length=1)
    styles: list[str] = Field(min_length=1)
    mode: Literal["product", "pairs"] = "product"
    pairs: list[tuple[int, int | list[int]]] | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


__all__ = [
    "BatchCreated",
    "BatchOut",
    "BatchRequest",
    "CheckpointOut",
    "ErrorResponse",
    "ImageOut",
    "JobErrorOut",
    "JobList",
    "JobOut",
    "Progress",
    "ReadyOut",
]
