"""Turning job rows into API responses, with links to results and checkpoints.

On S3 the links are presigned GETs (``storage.url_for``); for folder storage they point at the API's
own ``/v1/jobs/{id}/result`` and ``/v1/jobs/{id}/checkpoints/{index}[/preview]`` routes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from api.schemas import CheckpointOut, JobErrorOut, JobOut, ProgressOut
from api.status_schemas import ExecutionOut, QueueOut
from shared.jobs import JobStatus
from shared.models import Job
from shared.queue_position import QueueSpot
from shared.settings import Settings
from shared.storage import Storage


def base_url(settings: Settings) -> str:
    """Links start with STYLEQUEUE_PUBLIC_URL, or are relative (``/v1/...``) without one: never
    the client's ``Host`` header, which a caller controls and a shared cache would pass on."""
    return settings.public_url.rstrip("/")


class Linker:
    def __init__(self, request: Request | None, settings: Settings, storage: Storage) -> None:
        self.base = base_url(settings)
        self.storage = storage
        self.expires = settings.presign_expiry_s

    def link(self, key: str | None, api_path: str) -> str | None:
        if not key:
            return None
        url = self.storage.url_for(key, expires_s=self.expires)
        return url if url is not None else f"{self.base}{api_path}"


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _progress(raw: dict[str, Any] | None) -> ProgressOut:
    return ProgressOut(**_known(raw, ProgressOut))


def _known(raw: dict[str, Any] | None, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that ``raw`` (a JSON column) has, not null: a row written by an older
    or newer worker never breaks the answer."""
    return {k: v for k, v in (raw or {}).items() if k in model.model_fields and v is not None}


def job_out(job: Job, linker: Linker, queue: QueueSpot | None = None) -> JobOut:
    """``queue``: the job's place in its tenant's line (``shared.queue_position.spots``), if queued."""
    path = f"/v1/jobs/{job.id}"
    checkpoints = [
        CheckpointOut(
            scale=cp.get("scale"),
            iteration=cp.get("iteration"),
            step=cp.get("step"),
            url=linker.link(cp.get("key"), f"{path}/checkpoints/{cp.get('seq', i)}"),
            preview_url=linker.link(cp.get("preview_key"), f"{path}/checkpoints/{cp.get('seq', i)}/preview"),
        )
        for i, cp in enumerate(job.checkpoints or [])
    ]
    error = (
        JobErrorOut(code=job.error_code, message=job.error_message or "", retryable=job.error_retryable)
        if job.error_code
        else None
    )
    progress = _progress(job.progress)
    if job.status == JobStatus.SUCCEEDED:
        progress.fraction = 1.0
    return JobOut(
        id=job.id,
        status=job.status,
        batch_id=job.batch_id,
        content_id=job.content_image_id,
        style_ids=list(job.style_image_ids or []),
        mask_ids=None if job.mask_image_ids is None else list(job.mask_image_ids),
        params=job.params or {},
        priority=job.priority or 0,
        progress=progress,
        attempts=job.attempt,
        cancel_requested=job.cancel_requested,
        created_at=aware(job.created_at) or job.created_at,
        started_at=aware(job.started_at),
        finished_at=aware(job.finished_at),
        error=error,
        result_url=linker.link(job.result_key, f"{path}/result")
        if job.status == JobStatus.SUCCEEDED
        else None,
        checkpoints=checkpoints,
        execution=ExecutionOut(**_known(job.execution, ExecutionOut)) if job.execution else None,
        queue=QueueOut(position=queue.position, eta_seconds=queue.eta_seconds)
        if queue is not None and job.status == JobStatus.QUEUED
        else None,
    )


__all__ = ["Linker", "base_url", "job_out"]
