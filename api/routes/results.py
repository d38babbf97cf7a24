"""Downloading results and checkpoints: streamed from folder storage, or a 307 to a presigned URL."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.queries import get_job
from api.routes.jobs import ERRORS
from shared.errors import Conflict, NotFound
from shared.jobs import JobStatus
from shared.storage import ObjectNotFound, Storage

router = APIRouter(prefix="/v1/jobs", tags=["results"])

MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "pt": "application/octet-stream",
}


def _serve(storage: Storage, key: str, expires_s: int) -> Response:
    url = storage.url_for(key, expires_s=expires_s)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    try:
        data = storage.get_bytes(key)
    except ObjectNotFound:
        raise NotFound("object_missing", "the stored file is missing") from None
    ext = key.rsplit(".", 1)[-1].lower()
    filename = key.rsplit("/", 1)[-1]
    return Response(
        data,
        media_type=MEDIA_TYPES.get(ext, "application/octet-stream"),
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


@router.get("/{job_id}/result", responses={**ERRORS, 307: {"description": "to a presigned URL"}},
            summary="The result image (409 until the job succeeded)")
def job_result(job_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep,
               tenant: TenantDep) -> Response:
    job = get_job(session, tenant.id, job_id)
    if job.status != JobStatus.SUCCEEDED.value or not job.result_key:
        raise Conflict("not_finished", f"the job is {job.status}; no result", status=job.status)
    return _serve(storage, job.result_key, settings.presign_expiry_s)


def _checkpoint_key(session: SessionDep, tenant_id: str, job_id: str, index: int,
                    field: str) -> str:
    job = get_job(session, tenant_id, job_id)
    checkpoints = job.checkpoints or []
    if not 0 <= index < len(checkpoints) or not checkpoints[index].get(field):
        raise NotFound("checkpoint_not_found", f"job {job_id} has no checkpoint {index}")
    return str(checkpoints[index][field])


@router.get("/{job_id}/checkpoints/{index}", responses=ERRORS, summary="A checkpoint (.pt)")
def job_checkpoint(job_id: str, index: int, session: SessionDep, settings: SettingsDep,
                   storage: StorageDep, tenant: TenantDep) -> Response:
    key = _checkpoint_key(session, tenant.id, job_id, index, "key")
    return _serve(storage, key, settings.presign_expiry_s)


@router.get("/{job_id}/checkpoints/{index}/preview", responses=ERRORS,
            summary="A checkpoint's preview image (.png)")
def job_checkpoint_preview(job_id: str, index: int, session: SessionDep, settings: SettingsDep,
                           storage: StorageDep, tenant: TenantDep) -> Response:
    key = _checkpoint_key(session, tenant.id, job_id, index, "preview_key")
    return _serve(storage, key, settings.presign_expiry_s)
