"""Downloading results and checkpoints: streamed from folder storage, or a 307 to a presigned URL.

A job whose files retention deleted answers 410 ``result_expired``; a deleted job is not found.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from fastapi.responses import RedirectResponse

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.presenters import result_thumb
from api.queries import get_job
from api.schemas import ERRORS, ErrorResponse
from shared.errors import Conflict, Gone, NotFound
from shared.jobs import JobStatus
from shared.models import Job
from shared.retention import result_expired
from shared.storage import ObjectNotFound, Storage
from shared.storage_keys import (
    CHECKPOINT_MEDIA_TYPE,
    PREVIEW_MEDIA_TYPE,
    RESULT_MEDIA_TYPES,
    THUMB_MEDIA_TYPE,
    media_type,
)

router = APIRouter(prefix="/v1/jobs", tags=["results"])


def _binary(*media_types: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a download: the file itself (200), or a redirect to a presigned URL (307)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        **ERRORS,
        200: {"description": "the file", "content": {m: binary for m in media_types}},
        307: {"description": "a redirect to a presigned storage URL (S3)"},
        410: {"model": ErrorResponse, "description": "deleted after the retention period"},
    }


CheckpointStep = Annotated[
    int,
    Path(
        ge=0,
        le=2**31 - 1,
        description="the checkpoint's step (iterations done in all scales, as `checkpoints[].step` "
        "shows); a link of an older release named it by its seq, which is still accepted",
    ),
]
RESULT_DOC = _binary(*RESULT_MEDIA_TYPES)
CHECKPOINT_DOC = _binary(CHECKPOINT_MEDIA_TYPE)
PREVIEW_DOC = _binary(PREVIEW_MEDIA_TYPE)
THUMB_DOC = _binary(THUMB_MEDIA_TYPE)


def _check_kept(job: Job) -> None:
    """410 for a job whose result and checkpoints were deleted after the retention period."""
    if result_expired(job):
        raise Gone(
            "result_expired",
            f"the files of job {job.id} were deleted after the retention period; submit it again",
            status=job.status,
        )


def _serve(storage: Storage, key: str, expires_s: int) -> Response:
    url = storage.url_for(key, expires_s=expires_s)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    try:
        data = storage.get_bytes(key)
    except ObjectNotFound:
        raise NotFound("object_missing", "the stored file is missing") from None
    filename = key.rsplit("/", 1)[-1]
    return Response(
        data,
        media_type=media_type(key),
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


def finished(job: Job) -> str:
    """The key of a job's result: 409 until it succeeded, 410 once retention deleted it."""
    if job.status == JobStatus.SUCCEEDED:
        _check_kept(job)
    if job.status != JobStatus.SUCCEEDED or not job.result_key:
        raise Conflict("not_finished", f"the job is {job.status}; no result", status=job.status)
    return job.result_key


def finished_thumb(job: Job) -> str:
    """The key of the thumbnail of a job's result: as ``finished``, and 404 for a job finished
    before thumbnails were written."""
    finished(job)
    thumb = result_thumb(job)
    if thumb is None:
        raise NotFound("object_missing", f"job {job.id} finished before thumbnails were made: it has none")
    return thumb


@router.get(
    "/{job_id}/result",
    responses=RESULT_DOC,
    response_class=Response,
    summary="The result image (409 until the job succeeded, 410 once retention deleted it)",
)
def job_result(
    job_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    return _serve(storage, finished(get_job(session, tenant.id, job_id)), settings.presign_expiry_s)


@router.get(
    "/{job_id}/result/thumb",
    responses=THUMB_DOC,
    response_class=Response,
    summary="The result as a small JPEG thumbnail (long edge at most 256 px)",
)
def job_result_thumb(
    job_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    key = finished_thumb(get_job(session, tenant.id, job_id))
    return _serve(storage, key, settings.presign_expiry_s)


def find_checkpoint(refs: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The kept checkpoint at ``step`` (one per step: a step's objects have one key). Failing that,
    the one whose ``seq`` is ``step``: links before checkpoints were named by step used the seq
    (stable while older ones are pruned; rows written before seq existed count by position)."""
    by_step = next((ref for ref in refs if ref.get("step") == step), None)
    if by_step is not None:
        return by_step
    return next((ref for i, ref in enumerate(refs) if ref.get("seq", i) == step), None)


def _checkpoint_key(session: SessionDep, tenant_id: str, job_id: str, step: int, field: str) -> str:
    """The object (``field``: the checkpoint, its preview or its thumbnail) of the job's checkpoint at
    ``step``; 404 when the ref has no such field (a ref of an earlier version has no thumbnail)."""
    job = get_job(session, tenant_id, job_id)
    _check_kept(job)
    ref = find_checkpoint(list(job.checkpoints or []), step)
    if ref is None or not ref.get(field):
        kept = ", ".join(str(r.get("step")) for r in job.checkpoints or []) or "none"
        raise NotFound(
            "checkpoint_not_found", f"job {job_id} has no checkpoint at step {step} (kept: {kept})"
        )
    return str(ref[field])


@router.get(
    "/{job_id}/checkpoints/{step}",
    responses=CHECKPOINT_DOC,
    response_class=Response,
    summary="A checkpoint (.pt), by its step",
)
def job_checkpoint(
    job_id: str,
    step: CheckpointStep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    key = _checkpoint_key(session, tenant.id, job_id, step, "key")
    return _serve(storage, key, settings.presign_expiry_s)


@router.get(
    "/{job_id}/checkpoints/{step}/preview",
    responses=PREVIEW_DOC,
    response_class=Response,
    summary="A checkpoint's preview image (.png), by its step",
)
def job_checkpoint_preview(
    job_id: str,
    step: CheckpointStep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    key = _checkpoint_key(session, tenant.id, job_id, step, "preview_key")
    return _serve(storage, key, settings.presign_expiry_s)


@router.get(
    "/{job_id}/checkpoints/{step}/thumb",
    responses=THUMB_DOC,
    response_class=Response,
    summary="A checkpoint's preview as a small JPEG thumbnail (long edge at most 256 px), by its step",
)
def job_checkpoint_thumb(
    job_id: str,
    step: CheckpointStep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    key = _checkpoint_key(session, tenant.id, job_id, step, "thumb_key")
    return _serve(storage, key, settings.presign_expiry_s)
