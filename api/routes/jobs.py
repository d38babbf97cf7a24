"""``/v1/jobs``: submit one job, read, list, cancel."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api.deps import (
    PublisherDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    SubmitCtx,
    TenantDep,
    start_form_submission,
)
from api.forms import files, read_form, read_items, text, texts
from api.idem import commit_submission, header_key, respond
from api.imagestore import Item, Raw, image_dims, item_id, persist_images, resolve_items
from api.indoubt import Submission
from api.masks import check_job_masks, check_mask_count
from api.offload import admitted, off_loop
from api.queries import MAX_PAGE, get_job, list_jobs
from api.schemas import JOB_FORM_DOC, ErrorResponse, JobList, JobOut
from api.submit import (
    JobSpec,
    check_runnable,
    insert_jobs,
    parse_params_json,
    publish_and_mark,
    validate_params,
)
from api.views import Linker, job_out
from shared import jobstore
from shared.errors import Conflict, InvalidInput
from shared.idempotency import StoredResponse
from shared.params import JobParams
from shared.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_FIELDS = {"content", "style", "content_id", "style_id", "mask", "mask_id", "params"}
ERRORS: dict[int | str, dict[str, object]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 413, 422, 503)
}
def _check_fields(names: set[str]) -> None:
    unknown = sorted(names - JOB_FIELDS)
    if unknown:
        raise InvalidInput(
            "unknown_field",
            f"unknown form field {unknown[0]!r}; use {', '.join(sorted(JOB_FIELDS))}",
        )


@dataclass(frozen=True)
class JobDraft:
    """A job form as read (uploads in memory), before the CPU-bound validation."""

    items: list[Raw]  # the content first, then the styles, then the masks (one per style or none)
    params: str | None
    n_masks: int = 0


async def _read_job_form(form: FormData, settings: Settings) -> JobDraft:
    _check_fields(set(form.keys()))
    contents: list[UploadFile | str] = [*files(form, "content"), *texts(form, "content_id")]
    styles: list[UploadFile | str] = [*files(form, "style"), *texts(form, "style_id")]
    if not contents:
        raise InvalidInput("missing_content", "send a content image (content or content_id)")
    if len(contents) > 1:
        raise InvalidInput("too_many_contents", "one content image per job; use /v1/batches")
    if not styles:
        raise InvalidInput("missing_style", "send at least one style image (style or style_id)")
    if len(styles) > settings.max_styles:
        raise InvalidInput("too_many_styles",
                           f"{len(styles)} styles; the maximum is {settings.max_styles}")
    masks: list[UploadFile | str] = [*files(form, "mask"), *texts(form, "mask_id")]
    check_mask_count(len(masks), len(styles))
    names = ["content", *(f"style[{i}]" for i in range(len(styles))),
             *(f"mask[{i}]" for i in range(len(masks)))]
    return JobDraft(await read_items([*contents, *styles, *masks], settings, names),
                    text(form, "params"), len(masks))


def _validate_job(draft: JobDraft, settings: Settings) -> tuple[list[Item], int, JobParams]:
    """Params, then every image (decoded once): CPU-bound, so it runs off the event loop."""
    n_styles = len(draft.items) - 1 - draft.n_masks
    params = validate_params(parse_params_json(draft.params), settings, [n_styles])
    return resolve_items(draft.items, settings), draft.n_masks, params


def _create_job(ctx: SubmitCtx, items: list[Item], n_masks: int,
                params: JobParams) -> tuple[StoredResponse, bool]:
    """One transaction: images, the job, the idempotency key; then publish. Returns the answer
    and whether it is a replay (a concurrent request with the same key won)."""
    ids = [item_id(i) for i in items]
    content, styles = ids[0], ids[1:len(ids) - n_masks]
    masks = ids[len(ids) - n_masks:] if n_masks else None
    with ctx.sessions() as session:
        dims = image_dims(session, ctx.tenant.id, items)
        check_runnable(params, [dims[content]], [dims[s] for s in styles])
        check_job_masks(dims, content, masks or [])
        persist_images(session, ctx.storage, ctx.tenant.id,
                       [i for i in items if not isinstance(i, str)])
        spec = JobSpec(content, tuple(styles), None if masks is None else tuple(masks))
        (job_id,) = insert_jobs(session, tenant_id=ctx.tenant.id, batch_id=None, specs=[spec],
                                params=params, settings=ctx.settings)
        job = job_out(get_job(session, ctx.tenant.id, job_id), ctx.linker)
        answer = StoredResponse(202, job.model_dump(mode="json"))
        sub = Submission(ctx.tenant.id, (job_id,), None, ctx.idem.key if ctx.idem else None)
        winner = commit_submission(session, sub, ctx.idem, answer, ctx.indoubt)
    if winner is not None:
        return winner, True
    publish_and_mark(ctx.sessions, ctx.publisher, [job_id])
    return answer, False


@router.post("", status_code=202, response_model=JobOut, responses=ERRORS,
             openapi_extra=JOB_FORM_DOC, summary="Submit one job (multipart)")
async def submit_job(request: Request, settings: SettingsDep, tenant: TenantDep,
                     storage: StorageDep, publisher: PublisherDep) -> Response:
    """With an ``Idempotency-Key`` header, a repeat of the same request answers the first
    response (header ``Idempotent-Replayed: true``) and creates nothing."""
    key = header_key(request)
    form = await read_form(request, max_files=2 * settings.max_styles + 8,  # then our own check
                           timeout_s=settings.body_timeout_s)
    try:  # the form is on disk; reading its files into memory takes one of the upload slots
        async with admitted(request):
            ctx, first_answer = await start_form_submission(request, form, key, tenant, storage,
                                                            publisher)
            if first_answer is not None:
                return first_answer
            draft = await _read_job_form(form, settings)
            await form.close()
            items, n_masks, params = await off_loop(request, _validate_job, draft, settings)
            answer, replayed = await run_in_threadpool(_create_job, ctx, items, n_masks, params)
    finally:
        await form.close()
    return respond(answer, replayed=replayed)


@router.get("", response_model=JobList, responses=ERRORS, summary="List own jobs, newest first")
def list_own_jobs(
    request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep,
    tenant: TenantDep,
    status: str | None = None,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: str | None = None,
) -> JobList:
    jobs, next_cursor = list_jobs(session, tenant.id, status=status, batch_id=batch_id,
                                  limit=limit, cursor=cursor)
    linker = Linker(request, settings, storage)
    return JobList(items=[job_out(j, linker) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def read_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep,
             storage: StorageDep, tenant: TenantDep) -> JobOut:
    return job_out(get_job(session, tenant.id, job_id), Linker(request, settings, storage))


_CANCEL_CODES = {jobstore.CancelResult.CANCELED: 200, jobstore.CancelResult.REQUESTED: 202}


def _try_cancel(session: SessionDep, tenant_id: str, job_id: str) -> int | None:
    """One guarded attempt: 200 if a queued job was canceled, 202 if a running job was asked to
    stop, None if the job is in neither state."""
    result = jobstore.request_cancel(session, tenant_id, job_id)
    return None if result is None else _CANCEL_CODES[result]


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses={**ERRORS, 202: {"model": JobOut, "description": "stop requested"}},
             summary="Cancel: a queued job at once (200), a running one on request (202)")
def cancel_job(job_id: str, request: Request, response: Response, session: SessionDep,
               settings: SettingsDep, storage: StorageDep, tenant: TenantDep) -> JobOut:
    """A finished job answers 409 with its status. A running job keeps ``running`` (with
    ``cancel_requested``) until its worker stops, within about 2 s."""
    job = get_job(session, tenant.id, job_id)  # 404 for unknown or another tenant's job
    code = None
    for _ in range(3):  # a job may move between queued and running while we look
        code = _try_cancel(session, tenant.id, job_id)
        session.commit()
        session.expire_all()
        job = get_job(session, tenant.id, job_id)
        if code is not None or job.job_status.terminal:
            break
    if code is None:
        raise Conflict("job_finished", f"the job is already {job.status}", status=job.status)
    response.status_code = code
    logger.info("job_event job_id=%s event=cancel_%s", job.id,
                "done" if code == 200 else "requested")
    return job_out(job, Linker(request, settings, storage))
