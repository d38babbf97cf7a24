"""The one submission path of ``POST /v1/jobs`` and ``POST /v1/batches``.

Both routes run the same steps: the ``Idempotency-Key`` header; the body (a multipart form spooled to
disk within ``api.forms``' limits, or a JSON body); its fingerprint, and for a known key the first
answer replayed; the form's files read into memory (one upload slot, ``api.offload.admitted``); the
CPU-bound validation off the event loop (params, the plan of jobs from ``api.plans``, every image
decoded once); then one transaction in the threadpool (``create``) and the answer. What differs is
data: a route's ``SubmitRoute`` (its form, file count, count checks and validation) and the
``ValidSubmission`` that yields (the images, the plan of jobs, the params, batch or not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile

from api import webhook_input
from api.commit_recovery import Submission
from api.deps import SubmitCtx
from api.forms import check_fields, files, read_body, read_form, read_items, text, texts
from api.idempotency import (
    IdemRequest,
    commit_submission,
    form_request,
    header_key,
    json_request,
    replay,
    respond,
)
from api.imagestore import Item, Raw, image_dims, item_id, persist_images, resolve_items
from api.job_creation import (
    JobSpec,
    admit_jobs,
    check_runnable,
    dispatch_after_commit,
    insert_jobs,
    validate_params,
)
from api.masks import check_batch_masks, check_job_masks
from api.offload import admitted, off_loop
from api.plans import Plan
from api.presenters import job_out
from api.queries import get_job
from api.safejson import loads
from api.schemas import BatchCreated, FormSpec, ImageField
from api.webhook_input import WebhookRequest
from shared import logs
from shared.audit import audit
from shared.idempotency import StoredResponse
from shared.models import Batch, new_id, utcnow
from shared.params import JobParams
from shared.settings import Settings

logger = logging.getLogger(__name__)
D = TypeVar("D")


@dataclass(frozen=True)
class Draft:
    """A form as read (uploads in memory), before the CPU-bound validation."""

    contents: list[Raw]
    styles: list[Raw]
    masks: list[Raw]
    texts: Mapping[str, str | None]  # the form's text fields as sent (JSON still text)


@dataclass(frozen=True)
class ValidSubmission:
    """What one submission creates: its images (inspected uploads or ids), the plan, the params."""

    contents: list[Item]
    styles: list[Item]
    masks: list[Item]
    plan: Plan
    params: JobParams
    batch: bool  # a batch row, answered BatchCreated; else one job, answered JobOut
    priority: int = 0  # within the tenant's line (shared.dispatch)
    webhook: WebhookRequest | None = None  # where its events go (api.webhook_input)


def validated(
    contents: list[Raw],
    styles: list[Raw],
    masks: list[Raw],
    plan: Plan,
    raw_params: dict[str, Any],
    settings: Settings,
    *,
    batch: bool,
    priority: int = 0,
    webhook: WebhookRequest | None = None,
) -> ValidSubmission:
    """The params for the plan's jobs, then every image (decoded once). CPU-bound: off the loop."""
    # a masked job has one style region per style: W2 pays its eigendecompositions once per region
    regions = max((len(ss) if ms is not None else 1 for _, ss, ms in plan), default=1)
    params = validate_params(raw_params, settings, [len(ss) for _, ss, _ in plan], regions)
    items = resolve_items([*contents, *styles, *masks], settings)  # one pixel budget for all
    n_c, n_s = len(contents), len(styles)
    return ValidSubmission(
        items[:n_c], items[n_c : n_c + n_s], items[n_c + n_s :], plan, params, batch, priority, webhook
    )


@dataclass(frozen=True)
class SubmitRoute:
    """What a submission route adds to the shared path."""

    form: FormSpec  # its declared fields (api.schemas): the allowed-field check, the reader, OpenAPI
    max_files: Callable[[Settings], int]  # files a form may hold (before the count checks)
    check_counts: Callable[[int, int, int, Settings], None]  # contents, styles, masks: before reading
    validate: Callable[[Draft, Settings], ValidSubmission]  # CPU-bound: runs off the event loop
    validate_json: Callable[[Any, Settings], ValidSubmission] | None = None  # a JSON body, if any


async def submit(request: Request, ctx: SubmitCtx, route: SubmitRoute) -> Response:
    """Submit through ``route``: the first answer for a repeated Idempotency-Key, else create."""
    key = header_key(request)
    json_body = request.headers.get("content-type", "").lower().startswith("application/json")
    if route.validate_json is not None and json_body:
        return await _submit_json(request, ctx, key, route.validate_json)
    settings = ctx.settings
    form = await read_form(request, max_files=route.max_files(settings), timeout_s=settings.body_timeout_s)
    try:  # the form is on disk; reading its files into memory takes one of the upload slots
        async with admitted(request):
            ctx = replace(ctx, idem=await form_request(request, form, key))
            first_answer = await replay(ctx)
            if first_answer is not None:
                return first_answer
            draft = await read_draft(form, route, settings)
            await form.close()
            return await _validate_and_create(request, ctx, route.validate, draft)
    finally:
        await form.close()


async def _submit_json(
    request: Request, ctx: SubmitCtx, key: str | None, validate: Callable[[Any, Settings], ValidSubmission]
) -> Response:
    settings = ctx.settings
    raw = await read_body(request, timeout_s=settings.body_timeout_s)  # <= max_json_bytes
    body, idem = await off_loop(request, _json_body, raw, request.method, request.url.path, key, settings)
    ctx = replace(ctx, idem=idem)
    return await replay(ctx) or await _validate_and_create(request, ctx, validate, body)


def _json_body(
    raw: bytes, method: str, path: str, key: str | None, settings: Settings
) -> tuple[Any, IdemRequest | None]:
    body = loads(raw, what="the body", max_bytes=settings.max_json_bytes)
    return body, json_request(method, path, body, key)


async def _validate_and_create(
    request: Request, ctx: SubmitCtx, validate: Callable[[D, Settings], ValidSubmission], draft: D
) -> Response:
    sub = await off_loop(request, validate, draft, ctx.settings)
    if sub.webhook is not None:  # its host's lookup, in a pool of its own (api.webhook_input)
        sub = replace(sub, webhook=await webhook_input.resolved(sub.webhook, ctx.settings, ctx.tenant.id))
    answer, replayed = await run_in_threadpool(create, ctx, sub)
    return respond(answer, replayed=replayed)


def _slot(form: FormData, field: ImageField) -> list[UploadFile | str]:
    return [*files(form, field.name), *texts(form, field.id_name)]


async def _read(items: list[UploadFile | str], field: ImageField, settings: Settings) -> list[Raw]:
    return await read_items(items, settings, [field.label(i) for i in range(len(items))])


async def read_draft(form: FormData, route: SubmitRoute, settings: Settings) -> Draft:
    """The form's images (per slot: the files, then the ids), counted by the route before any file
    is read into memory, each within the per-file limit; and its text fields."""
    spec = route.form
    check_fields(form, spec)
    contents, styles, masks = (_slot(form, field) for field in spec.images)
    route.check_counts(len(contents), len(styles), len(masks), settings)
    return Draft(
        await _read(contents, spec.content, settings),
        await _read(styles, spec.style, settings),
        await _read(masks, spec.mask, settings),
        {t.name: text(form, t.name) for t in spec.texts},
    )


def create(ctx: SubmitCtx, sub: ValidSubmission) -> tuple[StoredResponse, bool]:
    """One transaction: the images, the batch row (for a batch), the jobs, the idempotency key; then
    publish. Returns the answer and whether it is a replay (a concurrent request with the same key
    won)."""
    tenant_id = ctx.tenant.id
    items = [*sub.contents, *sub.styles, *sub.masks]
    specs = _specs(sub)
    with ctx.sessions() as session:
        _check_images(sub, image_dims(session, tenant_id, items))
        admit_jobs(session, tenant_id, specs, sub.params, ctx.settings)  # before any object is stored
        persist_images(session, ctx.storage, tenant_id, [i for i in items if not isinstance(i, str)])
        batch_id = _add_batch(session, tenant_id, sub, len(specs)) if sub.batch else None
        job_ids = insert_jobs(
            session,
            tenant_id=tenant_id,
            batch_id=batch_id,
            specs=specs,
            params=sub.params,
            settings=ctx.settings,
            priority=sub.priority,
            admitted=True,
            webhook=sub.webhook,
        )
        answer = _answer(session, ctx, job_ids, batch_id)
        record = Submission(tenant_id, tuple(job_ids), batch_id, ctx.idem.key if ctx.idem else None)
        winner = commit_submission(session, record, ctx.idem, answer, ctx.indoubt)
    if winner is not None:
        return winner, True
    audit(
        "submit",
        tenant_id=tenant_id,
        key_prefix=ctx.tenant.key_prefix,
        job_id=job_ids[0],
        jobs=len(job_ids),
        batch_id=batch_id,
    )
    if batch_id is not None:
        logs.event(logger, "batch_created", job_id=job_ids[0], batch_id=batch_id, jobs=len(job_ids))
    dispatch_after_commit(ctx.sessions, ctx.publisher, ctx.settings, job_ids)
    return answer, False


def _check_images(sub: ValidSubmission, dims: Mapping[str, tuple[int, int]]) -> None:
    """Every image runnable at every scale; every mask with its content's aspect ratio."""
    contents, masks = [item_id(c) for c in sub.contents], [item_id(m) for m in sub.masks]
    check_runnable(sub.params, [dims[c] for c in contents], [dims[item_id(s)] for s in sub.styles])
    if sub.batch:
        check_batch_masks(dims, contents, masks, sub.plan)
    else:
        check_job_masks(dims, contents[0], masks)


def _specs(sub: ValidSubmission) -> list[JobSpec]:
    c, s, m = ([item_id(i) for i in items] for items in (sub.contents, sub.styles, sub.masks))
    return [
        JobSpec(c[ci], tuple(s[x] for x in ss), None if ms is None else tuple(m[x] for x in ms))
        for ci, ss, ms in sub.plan
    ]


def _add_batch(session: Session, tenant_id: str, sub: ValidSubmission, job_count: int) -> str:
    batch = Batch(
        id=new_id(),
        tenant_id=tenant_id,
        params=sub.params.model_dump(mode="json"),
        job_count=job_count,
        created_at=utcnow(),
        webhook=sub.webhook.url if sub.webhook else None,
        webhook_events=list(sub.webhook.events) if sub.webhook else None,
    )
    session.add(batch)
    session.flush()
    return batch.id


def _answer(session: Session, ctx: SubmitCtx, job_ids: list[str], batch_id: str | None) -> StoredResponse:
    """The 202 answer, stored with the key: the batch's job ids, or the job as GET shows it."""
    if batch_id is not None:
        created = BatchCreated(id=batch_id, job_count=len(job_ids), job_ids=job_ids)
        return StoredResponse(202, created.model_dump(mode="json"))
    job = job_out(get_job(session, ctx.tenant.id, job_ids[0]), ctx.linker)
    return StoredResponse(202, job.model_dump(mode="json"))


__all__ = [
    "Draft",
    "SubmitRoute",
    "ValidSubmission",
    "create",
    "read_draft",
    "submit",
    "validated",
]
