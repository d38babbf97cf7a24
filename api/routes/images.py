"""``/v1/images``: upload an image once, reference it by id (its sha256) in jobs and batches."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StorageDep, TenantCtx, TenantDep
from api.forms import files, read_form, read_upload
from api.imagestore import PendingImage, is_image_id, persist_images, validate_uploads
from api.offload import admitted, off_loop
from api.schemas import ERRORS, ImageOut
from shared.audit import audit
from shared.db import get_sessionmaker
from shared.errors import InvalidInput, NotFound
from shared.models import StoredImage, TenantImage
from shared.settings import Settings
from shared.storage import Storage

router = APIRouter(prefix="/v1/images", tags=["images"])

_FORM_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


def _image_out(img: PendingImage) -> ImageOut:
    return ImageOut(
        id=img.id, format=img.info.format, width=img.info.width, height=img.info.height, bytes=len(img.data)
    )


def _store(settings: Settings, storage: Storage, tenant: TenantCtx, img: PendingImage) -> bool:
    with get_sessionmaker(settings.database_url)() as session:
        fresh = persist_images(session, storage, tenant.id, [img])
        session.commit()
    audit("upload", tenant_id=tenant.id, key_prefix=tenant.key_prefix, image_id=img.id, fresh=bool(fresh))
    return bool(fresh)


@router.post(
    "",
    response_model=ImageOut,
    status_code=201,
    responses={**ERRORS, 200: {"model": ImageOut, "description": "already uploaded"}},
    openapi_extra=_FORM_DOC,
    summary="Upload one image (field 'file'): 201 the first time, 200 after",
)
async def upload_image(
    request: Request, response: Response, settings: SettingsDep, storage: StorageDep, tenant: TenantDep
) -> ImageOut:
    form = await read_form(request, max_files=1, timeout_s=settings.body_timeout_s)
    try:
        uploads = [*files(form, "file"), *files(form, "image"), *files(form, "content")]
        if len(uploads) != 1:
            raise InvalidInput("missing_file", "send exactly one image in the form field 'file'")
        async with admitted(request):  # the file in memory and its decode: one upload slot
            data = await read_upload(uploads[0], settings, "file")
            await form.close()
            (img,) = await off_loop(request, validate_uploads, [("file", data)], settings)
            fresh = await run_in_threadpool(_store, settings, storage, tenant, img)
    finally:
        await form.close()
    response.status_code = 201 if fresh else 200
    return _image_out(img)


@router.get("/{image_id}", response_model=ImageOut, responses=ERRORS)
def read_image(image_id: str, session: SessionDep, tenant: TenantDep) -> ImageOut:
    if not is_image_id(image_id):
        raise NotFound("unknown_image", f"no image {image_id[:80]!r}")
    img = session.scalar(
        select(StoredImage)
        .join(TenantImage, TenantImage.image_id == StoredImage.id)
        .where(StoredImage.id == image_id, TenantImage.tenant_id == tenant.id)
    )
    if img is None:
        raise NotFound("unknown_image", f"no image {image_id!r}")
    return ImageOut(id=img.id, format=img.format, width=img.width, height=img.height, bytes=img.bytes)
