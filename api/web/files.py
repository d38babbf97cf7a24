"""What the page's ``<img>`` tags, downloads and live updates load, signed in by the session cookie:
uploaded images, checkpoint previews, results, their small thumbnails (``worker.thumbs``), a batch's
results as one streamed zip, and the live events (``api.routes.events``' own routes, for the session's
tenant).

Images are shown inline, from storage or by a redirect to a presigned URL (S3), with an ETag and
``Cache-Control: private, no-cache``: the browser revalidates each time, so the signed-in tenant is
checked even for a cached image (a browser shared by two tenants never shows one the other's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StorageDep
from api.imagestore import is_image_id
from api.presenters import result_thumb
from api.queries import get_batch, get_job
from api.routes.events import batch_events, job_events
from api.routes.results import find_checkpoint
from api.web.auth import WebUser, resolve, signed_out
from api.web.views import batch_jobs
from api.web.zipstream import Entry, reader, zip_chunks
from shared.errors import Conflict, Gone, NotFound
from shared.jobs import JobStatus
from shared.models import Job, StoredImage, TenantImage
from shared.retention import result_expired
from shared.settings import Settings
from shared.storage import ObjectNotFound, Storage
from shared.storage_keys import (
    FORMAT_MEDIA_TYPES,
    PREVIEW_MEDIA_TYPE,
    THUMB_MEDIA_TYPE,
    media_type,
    result_extension,
)

router = APIRouter(prefix="/web", include_in_schema=False)
Step = Annotated[int, Path(ge=0, le=2**31 - 1)]


def _user(request: Request, session: Session, settings: Settings, *, count: bool = False) -> WebUser:
    user = resolve(request, session, settings, count=count)
    if user is None:
        raise signed_out()
    return user


def _serve(
    request: Request, storage: Storage, settings: Settings, key: str, kind: str, download: str | None = None
) -> Response:
    """The object inline (or as a download named ``download``), revalidated on every use."""
    etag = f'"{hashlib.sha256(key.encode()).hexdigest()[:20]}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    url = storage.url_for(key, expires_s=settings.presign_expiry_s)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    try:
        data = storage.get_bytes(key)
    except ObjectNotFound:
        raise NotFound("object_missing", "the stored file is missing") from None
    headers["Content-Disposition"] = f'attachment; filename="{download}"' if download else "inline"
    return Response(data, media_type=kind, headers=headers)


@router.get("/images/{image_id}")
def uploaded_image(
    image_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    user = _user(request, session, settings)
    found = (
        session.scalar(
            select(StoredImage)
            .join(TenantImage, TenantImage.image_id == StoredImage.id)
            .where(StoredImage.id == image_id, TenantImage.tenant_id == user.tenant.id)
        )
        if is_image_id(image_id)
        else None
    )
    if found is None:
        raise NotFound("unknown_image", "no such image")
    kind = FORMAT_MEDIA_TYPES.get(found.format, "application/octet-stream")
    return _serve(request, storage, settings, found.storage_key, kind)


def _kept(job: Job) -> Job:
    if result_expired(job):
        raise Gone("result_expired", "the job's files were deleted after the retention period")
    return job


def _checkpoint_object(
    request: Request, session: Session, settings: Settings, job_id: str, step: int, field: str
) -> str:
    """The key (``field``: ``preview_key`` or ``thumb_key``) of the session's tenant's job's checkpoint
    at ``step``; 404 when it has none (pruned, or a ref of an earlier version without a thumbnail)."""
    job = _kept(get_job(session, _user(request, session, settings).tenant.id, job_id))
    ref = find_checkpoint(list(job.checkpoints or []), step)
    if ref is None or not ref.get(field):
        raise NotFound(
            "checkpoint_not_found", f"the job has no checkpoint at step {step} (older ones are pruned)"
        )
    return str(ref[field])


@router.get("/jobs/{job_id}/checkpoints/{step}/preview")
def checkpoint_preview(
    job_id: str, step: Step, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    """A checkpoint's preview by its step, as the API's links name it (``api.routes.results``)."""
    key = _checkpoint_object(request, session, settings, job_id, step, "preview_key")
    return _serve(request, storage, settings, key, PREVIEW_MEDIA_TYPE)


@router.get("/jobs/{job_id}/checkpoints/{step}/thumb")
def checkpoint_thumb(
    job_id: str, step: Step, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    """The small JPEG thumbnail of a checkpoint's preview, by its step (the grids and the timeline)."""
    key = _checkpoint_object(request, session, settings, job_id, step, "thumb_key")
    return _serve(request, storage, settings, key, THUMB_MEDIA_TYPE)


@router.get("/jobs/{job_id}/result")
def job_result(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    download: Annotated[bool, Query()] = False,
) -> Response:
    job = get_job(session, _user(request, session, settings).tenant.id, job_id)
    if job.status != JobStatus.SUCCEEDED or not job.result_key:
        raise Conflict("not_finished", f"the job is {job.status}; no result yet")
    _kept(job)
    key = job.result_key
    name = f"{job.id}.{key.rsplit('.', 1)[-1]}" if download else None
    return _serve(request, storage, settings, key, media_type(key), download=name)


@router.get("/jobs/{job_id}/result/thumb")
def job_result_thumb(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    """The small JPEG thumbnail of the result (the gallery, the grids); 404 for a job finished
    before thumbnails were written (the page links its full result instead)."""
    job = get_job(session, _user(request, session, settings).tenant.id, job_id)
    if job.status != JobStatus.SUCCEEDED or not job.result_key:
        raise Conflict("not_finished", f"the job is {job.status}; no result yet")
    thumb = result_thumb(_kept(job))
    if thumb is None:
        raise NotFound("object_missing", "the job finished before thumbnails were made: it has none")
    return _serve(request, storage, settings, thumb, THUMB_MEDIA_TYPE)


def entry_name(index: int, job: Job) -> str:
    """``003_c-1a2b3c4d_s-5e6f7a8b.png``: the job's place in its batch and its images' ids."""
    styles = "+".join(s[:8] for s in job.style_image_ids or [])
    ext = result_extension(str((job.params or {}).get("output_format", "png")))
    if job.result_key:
        ext = job.result_key.rsplit(".", 1)[-1]
    return f"{index + 1:03d}_c-{job.content_image_id[:8]}_s-{styles}.{ext}"


def _notes(batch_id: str, lines: list[str]) -> Callable[[list[str]], str]:
    def notes(missing: list[str]) -> str:
        gone = [f"{name}: its stored file is missing" for name in missing]
        return "\n".join([f"Results of batch {batch_id}", "", *lines, *gone, ""])

    return notes


@router.get("/batches/{batch_id}/results.zip")
def batch_zip(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    """Every result of the batch in one zip, streamed as it is written (one result in memory at once)."""
    tenant = _user(request, session, settings, count=True).tenant
    get_batch(session, tenant.id, batch_id)
    entries, lines = [], []
    for index, job in enumerate(batch_jobs(session, tenant.id, batch_id)):
        name = entry_name(index, job)
        if job.status == JobStatus.SUCCEEDED and job.result_key and not result_expired(job):
            entries.append(Entry(name, reader(storage, job.result_key), job.finished_at or job.created_at))
        else:
            lines.append(f"{index + 1:03d} (job {job.id}): {job.status}, no result")
    session.close()  # nothing is read from the database while the archive streams
    return StreamingResponse(
        zip_chunks(entries, _notes(batch_id, lines)),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="batch-{batch_id[:8]}-results.zip"',
            "Cache-Control": "no-store",
        },
    )


@router.get("/batches/{batch_id}/events")
def batch_stream(
    batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    """``GET /v1/batches/{id}/events`` for the signed-in tenant (an EventSource sends no header)."""
    tenant = _user(request, session, settings, count=True).tenant
    return batch_events(batch_id, request, session, settings, storage, tenant)


@router.get("/jobs/{job_id}/events")
def job_stream(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> Response:
    tenant = _user(request, session, settings, count=True).tenant
    return job_events(job_id, request, session, settings, storage, tenant)


__all__ = ["entry_name", "router"]
