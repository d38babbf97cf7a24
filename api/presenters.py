"""Turning job rows into API responses, with links to results and checkpoints.

On S3 the links are presigned GETs (``storage.url_for``); for folder storage they point at the API's
own ``/v1/jobs/{id}/result[/thumb]`` and ``/v1/jobs/{id}/checkpoints/{step}[/preview|/thumb]`` routes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from api.schemas import CheckpointOut, JobErrorOut, JobOut, ProgressOut
from api.status_schemas import ExecutionOut, QueueOut
from shared import storage_keys
from shared.jobs import JobStatus
from shared.models import Job
from shared.queue_position import QueueSpot
from shared.settings import Settings
from shared.storage import Storage


def base_url(settings: Settings) -> str:
    """Links start with STYLEQUEUE_PUBLIC_URL, or are relative (``/v1/...``) without one: never
    the client's ``Host`` header, which a caller controls and a shared cache would pass on."""
    return settings.public_url.rstrip("/")


def with_location(response: Response, settings: Settings, collection: str) -> Response:
    """A 202 submission answer (a replay too) names what it created: ``Location`` is the URL of
    the job or batch (``collection``: ``/v1/jobs`` or ``/v1/batches``), with the links' base."""
    if response.status_code == 202:
        created = json.loads(bytes(response.body))
        response.headers["Location"] = f"{base_url(settings)}{collection}/{created['id']}"
    return response


def counted_attempts(job: Job) -> tuple[int, int]:
    """(attempts that counted, hand-backs) of a job: a graceful hand-back (a worker's shutdown, a
    transient error: ``shared.jobstore.release``) keeps ``attempt`` (the next claim bumps it) and is
    counted in ``handbacks``."""
    attempt = job.attempt or 0
    handed_back = min(max(job.handbacks or 0, 0), attempt)
    return attempt - handed_back, handed_back


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


def _checkpoint(cp: dict[str, Any], position: int, base: str, linker: Linker) -> CheckpointOut:
    """A checkpoint, linked by its step (``api.routes.results``); a ref without one (none is
    written so) by its seq, which the route also accepts."""
    step = cp.get("step")
    ref = step if step is not None else cp.get("seq", position)
    return CheckpointOut(
        scale=cp.get("scale"),
        iteration=cp.get("iteration"),
        step=step,
        url=linker.link(cp.get("key"), f"{base}/{ref}"),
        preview_url=linker.link(cp.get("preview_key"), f"{base}/{ref}/preview"),
        thumb_url=linker.link(cp.get("thumb_key"), f"{base}/{ref}/thumb"),
    )


def result_thumb(job: Job) -> str | None:
    """The stored thumbnail of the job's result (``worker.settle`` records it in ``execution``);
    None without a result, or for a job finished before thumbnails were written."""
    thumb = (job.execution or {}).get(storage_keys.RESULT_THUMB_FIELD)
    if job.status != JobStatus.SUCCEEDED or not job.result_key or not isinstance(thumb, str):
        return None
    return thumb or None


def job_out(job: Job, linker: Linker, queue: QueueSpot | None = None) -> JobOut:
    """``queue``: the job's place in its tenant's line (``shared.queue_position.spots``), if queued."""
    path = f"/v1/jobs/{job.id}"
    checkpoints = [
        _checkpoint(cp, i, f"{path}/checkpoints", linker) for i, cp in enumerate(job.checkpoints or [])
    ]
    error = (
        JobErrorOut(code=job.error_code, message=job.error_message or "", retryable=job.error_retryable)
        if job.error_code
        else None
    )
    progress = _progress(job.progress)
    attempts, handed_back = counted_attempts(job)
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
        attempts=attempts,
        handed_back=handed_back,
        cancel_requested=job.cancel_requested,
        created_at=aware(job.created_at) or job.created_at,
        started_at=aware(job.started_at),
        finished_at=aware(job.finished_at),
        error=error,
        result_url=linker.link(job.result_key, f"{path}/result")
        if job.status == JobStatus.SUCCEEDED
        else None,
        result_thumb_url=linker.link(result_thumb(job), f"{path}/result/thumb"),
        checkpoints=checkpoints,
        execution=ExecutionOut(**_known(job.execution, ExecutionOut)) if job.execution else None,
        queue=QueueOut(position=queue.position, eta_seconds=queue.eta_seconds)
        if queue is not None and job.status == JobStatus.QUEUED
        else None,
    )


__all__ = ["Linker", "base_url", "counted_attempts", "job_out", "result_thumb", "with_location"]
