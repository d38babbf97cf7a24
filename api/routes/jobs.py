"""``/v1/jobs``: submit one job, read, list, cancel, delete."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api import webhook_input
from api.deps import SessionDep, SettingsDep, StorageDep, SubmitCtxDep, TenantDep
from api.job_creation import parse_params_json, parse_priority
from api.masks import check_mask_count
from api.plans import one_job
from api.presenters import Linker, job_out, with_location
from api.queries import MAX_PAGE, JobFilters, get_job, list_jobs
from api.schemas import ERRORS, JOB_FORM, JOB_FORM_DOC, JobErrorOut, JobList, JobOut
from api.submission import Draft, SubmitRoute, ValidSubmission, submit, validated
from shared import jobstore, logs, queue_position, retention
from shared.audit import audit
from shared.errors import Conflict, InvalidInput
from shared.jobs import JobStatus
from shared.models import Job, utcnow
from shared.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _check_counts(n_contents: int, n_styles: int, n_masks: int, settings: Settings) -> None:
    if not n_contents:
        raise InvalidInput("missing_content", "send a content image (content or content_id)")
    if n_contents > 1:
        raise InvalidInput("too_many_contents", "one content image per job; use /v1/batches")
    if not n_styles:
        raise InvalidInput("missing_style", "send at least one style image (style or style_id)")
    if n_styles > settings.max_styles:
        raise InvalidInput("too_many_styles", f"{n_styles} styles; the maximum is {settings.max_styles}")
    check_mask_count(n_masks, n_styles)


def _validate(draft: Draft, settings: Settings) -> ValidSubmission:
    """Params, then every image (decoded once)."""
    plan = one_job(len(draft.styles), len(draft.masks))
    return validated(
        draft.contents,
        draft.styles,
        draft.masks,
        plan,
        parse_params_json(draft.texts["params"]),
        settings,
        batch=False,
        priority=parse_priority(draft.texts["priority"]),
        webhook=webhook_input.parsed(
            draft.texts["webhook"],
            webhook_input.parse_events_field(draft.texts["webhook_events_filter"]),
            settings,
            batch=False,
        ),
    )


SUBMIT_JOB = SubmitRoute(
    form=JOB_FORM,
    max_files=lambda settings: 2 * settings.max_styles + 8,  # then the count checks
    check_counts=_check_counts,
    validate=_validate,
)


def created_doc(what: str) -> dict[int | str, dict[str, object]]:
    """OpenAPI of a submission's answers: the errors, and the 202's ``Location`` header."""
    location = {
        "description": f"the URL of the {what} (with STYLEQUEUE_PUBLIC_URL)",
        "schema": {"type": "string"},
    }
    return {**ERRORS, 202: {"description": "accepted", "headers": {"Location": location}}}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses=created_doc("job"),
    openapi_extra=JOB_FORM_DOC,
    summary="Submit one job (multipart)",
)
async def submit_job(request: Request, ctx: SubmitCtxDep) -> Response:
    """With an ``Idempotency-Key`` header, a repeat of the same request answers the first
    response (header ``Idempotent-Replayed: true``) and creates nothing. ``Location``: the job."""
    return with_location(await submit(request, ctx, SUBMIT_JOB), ctx.settings, "/v1/jobs")


@router.get("", response_model=JobList, responses=ERRORS, summary="List own jobs, newest first")
def list_own_jobs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
    status: Annotated[str | None, Query(description="one status: queued, running, succeeded, ...")] = None,
    batch_id: Annotated[str | None, Query(description="the jobs of one batch")] = None,
    created_after: Annotated[
        str | None, Query(description="ISO 8601; jobs created at or after it (UTC without an offset)")
    ] = None,
    created_before: Annotated[str | None, Query(description="ISO 8601; jobs created before it")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page (same filters)")
    ] = None,
) -> JobList:
    """Newest first. The filters combine; follow ``next_cursor`` with the same filters."""
    filters = JobFilters.parse(status, batch_id, created_after, created_before)
    jobs, next_cursor = list_jobs(session, tenant.id, filters, limit=limit, cursor=cursor)
    linker = Linker(request, settings, storage)
    spots = queue_position.spots(session, tenant.id, jobs, utcnow())  # a few queries for the whole page
    return JobList(
        items=[_view(j, job_out(j, linker, spots.get(j.id))) for j in jobs], next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def read_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> JobOut:
    job = get_job(session, tenant.id, job_id)
    spot = queue_position.spots(session, tenant.id, [job], utcnow()).get(job.id)
    return _view(job, job_out(job, Linker(request, settings, storage), spot))


_CANCEL_CODES = {jobstore.CancelResult.CANCELED: 200, jobstore.CancelResult.REQUESTED: 202}


def _try_cancel(session: SessionDep, tenant_id: str, job_id: str) -> int | None:
    """One guarded attempt: 200 if a queued job was canceled, 202 if a running job was asked to
    stop, None if the job is in neither state."""
    result = jobstore.request_cancel(session, tenant_id, job_id)
    return None if result is None else _CANCEL_CODES[result]


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={**ERRORS, 202: {"model": JobOut, "description": "stop requested"}},
    summary="Cancel: a queued job at once (200), a running one on request (202)",
)
def cancel_job(
    job_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> JobOut:
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
    logs.event(logger, "cancel_done" if code == 200 else "cancel_requested", job_id=job.id)
    return job_out(job, Linker(request, settings, storage))


EXPIRED_MESSAGE = "the result and checkpoints were deleted after the retention period; submit the job again"


def _view(job: Job, out: JobOut) -> JobOut:
    """A succeeded job whose result retention deleted says so (``error.code`` ``result_expired``)."""
    if job.status == JobStatus.SUCCEEDED and out.error is None and retention.result_expired(job):
        out.error = JobErrorOut(code="result_expired", message=EXPIRED_MESSAGE, retryable=None)
    return out


class DeletionOut(BaseModel):
    """A delete that waits for running jobs to stop (202); a finished delete answers 204, no body."""

    id: str
    status: str = Field("deleting", description="hidden now; deleted once its running jobs stopped")
    running: int = Field(description="jobs asked to stop first")
    message: str


def deletion_answer(thing_id: str, done: retention.Deletion) -> Response:
    """204 when everything is deleted, else 202 saying what the deletion waits for."""
    if done.done:
        return Response(status_code=204)
    message = (
        f"{done.running} running job(s) asked to stop: their results and checkpoints are deleted once "
        "they have (within seconds)"
        if done.running
        else "hidden; some stored files could not be deleted yet and will be removed later"
    )
    body = DeletionOut(id=thing_id, running=done.running, message=message)
    return JSONResponse(body.model_dump(), status_code=202)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses={**ERRORS, 202: {"model": DeletionOut, "description": "deleted once the job has stopped"}},
    summary="Delete a job: 204 done, 202 while a running job stops",
)
def delete_job(job_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> Response:
    """A queued job is canceled and deleted; a running one is asked to stop, hidden at once (404
    afterwards) and its files deleted once its worker stopped. Its images go once no job names them."""
    get_job(session, tenant.id, job_id)  # 404: unknown, another tenant's, or already deleted
    done = retention.delete_jobs(session, storage, tenant.id, job_id=job_id)
    audit(
        "delete_job", tenant_id=tenant.id, key_prefix=tenant.key_prefix, job_id=job_id, running=done.running
    )
    return deletion_answer(job_id, done)
