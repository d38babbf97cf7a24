"""``/v1/batches``: many jobs in one request (contents x styles), accepted whole or not at all.

Everything is validated first; then one transaction stores the images, the batch row and all jobs
(one bulk INSERT); then every message is published over one producer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError
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
from api.forms import files, json_field, read_body, read_form, read_items, text, texts
from api.idem import (
    IdemRequest,
    commit_submission,
    header_key,
    json_request,
    replay,
    respond,
)
from api.imagestore import Item, Raw, image_dims, item_id, persist_images, resolve_items
from api.indoubt import Submission
from api.limits import MAX_BATCH_FILES
from api.masks import MaskPlan, check_batch_masks, check_masks_used, pair_masks
from api.offload import admitted, off_loop
from api.queries import batch_summary, get_batch
from api.routes.jobs import ERRORS
from api.safejson import loads
from api.schemas import BATCH_DOC, BatchCreated, BatchOut, BatchRequest, Pair
from api.submit import (
    JobSpec,
    check_runnable,
    insert_jobs,
    parse_params_json,
    publish_and_mark,
    validate_params,
)
from shared.errors import InvalidInput
from shared.idempotency import StoredResponse
from shared.models import Batch, new_id, utcnow
from shared.params import JobParams
from shared.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["batches"])

Plan = list[tuple[int, tuple[int, ...], MaskPlan]]  # (content, style indexes, mask indexes) per job
_PAIRS = TypeAdapter(list[Pair])  # strict: no true/0.0 indexes
PAIRS_SHAPE = ("pairs must be a list of [content, style(s)] or [content, style(s), [mask per "
               "style]] (integer indexes)")
BATCH_FIELDS = {"content", "style", "content_id", "style_id", "mask", "mask_id", "params", "mode",
                "pairs"}


def plan_jobs(n_contents: int, n_styles: int, mode: str, pairs: Any, max_jobs: int,
              n_masks: int = 0) -> Plan:
    if mode not in ("product", "pairs"):
        raise InvalidInput("invalid_mode", "mode must be 'product' or 'pairs'")
    if not n_contents:
        raise InvalidInput("missing_content", "send at least one content image")
    if not n_styles:
        raise InvalidInput("missing_style", "send at least one style image")
    if mode == "product":
        if pairs:
            raise InvalidInput("invalid_pairs", "pairs are only used with mode 'pairs'")
        count = n_contents * n_styles
        if count > max_jobs:
            raise InvalidInput("batch_too_large", f"{count} jobs; the maximum is {max_jobs}")
        check_masks_used(n_masks, mode, [])
        return [(c, (s,), None) for c in range(n_contents) for s in range(n_styles)]
    try:
        parsed = _PAIRS.validate_python(pairs if pairs is not None else [])
    except ValidationError:
        raise InvalidInput("invalid_pairs", PAIRS_SHAPE) from None
    if not parsed:
        raise InvalidInput("invalid_pairs", "mode 'pairs' needs a non-empty pairs list")
    if len(parsed) > max_jobs:
        raise InvalidInput("batch_too_large", f"{len(parsed)} jobs; the maximum is {max_jobs}")
    plan: Plan = []
    for pair in parsed:
        c, s = pair[0], pair[1]
        styles = (s,) if isinstance(s, int) else tuple(s)
        if not 0 <= c < n_contents or not styles or any(not 0 <= x < n_styles for x in styles):
            raise InvalidInput(
                "invalid_pairs",
                f"pair [{c}, {s}] is out of range: {n_contents} contents, {n_styles} styles",
            )
        plan.append((c, styles, pair_masks(pair, len(styles), n_masks)))
    check_masks_used(n_masks, mode, [m for _, _, m in plan])
    return plan


@dataclass(frozen=True)
class BatchDraft:
    """A batch as read (uploads in memory, JSON still text), before the CPU-bound validation."""

    contents: list[Raw]
    styles: list[Raw]
    masks: list[Raw]
    mode: str
    pairs: str | None  # JSON text (form field)
    params: str | None  # JSON text (form field)


Parsed = tuple[list[Raw], list[Raw], list[Raw], str, Any, dict[str, Any]]  # + masks, mode, pairs


def _from_json(body: Any, settings: Settings) -> Parsed:
    try:
        req = BatchRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        where = tuple(err.get("loc", ()))
        if where[:1] == ("pairs",) and len(where) > 1:  # one pair (not the list) is malformed
            raise InvalidInput("invalid_pairs", f"pairs.{where[1]}: {PAIRS_SHAPE}") from None
        loc = ".".join(str(x) for x in where)[:100]
        code = {"extra_forbidden": "unknown_field", "too_long": "batch_too_large"}.get(
            str(err.get("type")), "invalid_request")
        raise InvalidInput(code, f"{loc}: {err.get('msg')}") from None
    for name, ids in (("contents", req.contents), ("styles", req.styles), ("masks", req.masks)):
        if len(ids) > settings.max_batch_jobs:
            raise InvalidInput("batch_too_large", f"{len(ids)} {name}; the maximum is "
                               f"{settings.max_batch_jobs} (a batch has at most that many jobs)")
    return list(req.contents), list(req.styles), list(req.masks), req.mode, req.pairs, req.params


async def _read_form(form: FormData, settings: Settings) -> BatchDraft:
    """Contents: uploaded ``content`` files then ``content_id`` values (same for styles, masks)."""
    unknown = sorted(set(form.keys()) - BATCH_FIELDS)
    if unknown:
        raise InvalidInput("unknown_field", f"unknown form field {unknown[0][:80]!r}")
    contents: list[UploadFile | str] = [*files(form, "content"), *texts(form, "content_id")]
    styles: list[UploadFile | str] = [*files(form, "style"), *texts(form, "style_id")]
    masks: list[UploadFile | str] = [*files(form, "mask"), *texts(form, "mask_id")]
    for name, items in (("contents", contents), ("styles", styles), ("masks", masks)):
        if len(items) > settings.max_batch_jobs:
            raise InvalidInput("batch_too_large",
                               f"{len(items)} {name}; the maximum is {settings.max_batch_jobs}")
    return BatchDraft(
        await read_items(contents, settings, [f"content[{i}]" for i in range(len(contents))]),
        await read_items(styles, settings, [f"style[{i}]" for i in range(len(styles))]),
        await read_items(masks, settings, [f"mask[{i}]" for i in range(len(masks))]),
        text(form, "mode") or "product", text(form, "pairs"), text(form, "params"),
    )


@dataclass(frozen=True)
class Resolved:
    """A validated batch: its images inspected (or ids), the job plan and the params."""

    contents: list[Item]
    styles: list[Item]
    masks: list[Item]
    plan: Plan
    params: JobParams


def _validate(draft: BatchDraft | Any, settings: Settings) -> Resolved:
    """A form draft or a parsed JSON body: the plan, params, then every image (decoded once).
    CPU-bound, so it runs off the event loop."""
    if isinstance(draft, BatchDraft):
        contents, styles, masks, mode = draft.contents, draft.styles, draft.masks, draft.mode
        pairs, raw = json_field(draft.pairs, "pairs"), parse_params_json(draft.params)
    else:
        contents, styles, masks, mode, pairs, raw = _from_json(draft, settings)
    plan = plan_jobs(len(contents), len(styles), mode, pairs, settings.max_batch_jobs, len(masks))
    params = validate_params(raw, settings, [len(ss) for _, ss, _ in plan])
    items = resolve_items([*contents, *styles, *masks], settings)  # one pixel budget for all
    n_c, n_s = len(contents), len(styles)
    return Resolved(items[:n_c], items[n_c:n_c + n_s], items[n_c + n_s:], plan, params)


def _specs(b: Resolved) -> list[JobSpec]:
    c, s, m = ([item_id(i) for i in items] for items in (b.contents, b.styles, b.masks))
    return [JobSpec(c[ci], tuple(s[x] for x in ss), None if ms is None else tuple(m[x] for x in ms))
            for ci, ss, ms in b.plan]


def _create_batch(ctx: SubmitCtx, b: Resolved) -> tuple[StoredResponse, bool]:
    """One transaction: images, the batch, its jobs, the idempotency key; then publish."""
    tenant_id = ctx.tenant.id
    items = b.contents + b.styles + b.masks
    specs = _specs(b)
    with ctx.sessions() as session:
        dims = image_dims(session, tenant_id, items)
        check_runnable(b.params, [dims[item_id(c)] for c in b.contents],
                       [dims[item_id(s)] for s in b.styles])
        check_batch_masks(dims, [item_id(c) for c in b.contents], [item_id(m) for m in b.masks],
                          b.plan)
        persist_images(session, ctx.storage, tenant_id, [i for i in items if not isinstance(i, str)])
        batch = Batch(id=new_id(), tenant_id=tenant_id, params=b.params.model_dump(mode="json"),
                      job_count=len(specs), created_at=utcnow())
        session.add(batch)
        session.flush()
        job_ids = insert_jobs(session, tenant_id=tenant_id, batch_id=batch.id, specs=specs,
                              params=b.params, settings=ctx.settings)
        created = BatchCreated(id=batch.id, job_count=len(job_ids), job_ids=job_ids)
        answer = StoredResponse(202, created.model_dump(mode="json"))
        sub = Submission(tenant_id, tuple(job_ids), batch.id, ctx.idem.key if ctx.idem else None)
        winner = commit_submission(session, sub, ctx.idem, answer, ctx.indoubt)
    if winner is not None:
        return winner, True
    logger.info("job_event job_id=%s event=batch_created batch_id=%s jobs=%d",
                job_ids[0], batch.id, len(job_ids))
    publish_and_mark(ctx.sessions, ctx.publisher, job_ids)
    return answer, False


def _json_body(raw: bytes, method: str, path: str, key: str | None,
               settings: Settings) -> tuple[Any, IdemRequest | None]:
    body = loads(raw, what="the body", max_bytes=settings.max_json_bytes)
    return body, json_request(method, path, body, key)


@router.post("", status_code=202, response_model=BatchCreated, responses=ERRORS,
             openapi_extra=BATCH_DOC,
             summary="Submit many jobs: JSON naming image ids, or multipart files")
async def submit_batch(request: Request, settings: SettingsDep, tenant: TenantDep,
                       storage: StorageDep, publisher: PublisherDep) -> Response:
    """With an ``Idempotency-Key`` header, a repeat of the same request answers the first
    response (header ``Idempotent-Replayed: true``) and creates nothing."""
    key = header_key(request)
    if request.headers.get("content-type", "").lower().startswith("application/json"):
        raw = await read_body(request, timeout_s=settings.body_timeout_s)  # <= max_json_bytes
        body, idem = await off_loop(request, _json_body, raw, request.method, request.url.path,
                                    key, settings)
        ctx = SubmitCtx.build(request, tenant, storage, publisher, idem)
        return await replay(ctx, idem) or await _submit(request, ctx, body)
    form = await read_form(request, max_files=MAX_BATCH_FILES, timeout_s=settings.body_timeout_s)
    try:  # the form is on disk; reading its files into memory takes one of the upload slots
        async with admitted(request):
            ctx, first_answer = await start_form_submission(request, form, key, tenant, storage,
                                                            publisher)
            if first_answer is not None:
                return first_answer
            draft = await _read_form(form, settings)
            await form.close()
            return await _submit(request, ctx, draft)
    finally:
        await form.close()


async def _submit(request: Request, ctx: SubmitCtx, draft: BatchDraft | Any) -> Response:
    resolved = await off_loop(request, _validate, draft, ctx.settings)
    answer, replayed = await run_in_threadpool(_create_batch, ctx, resolved)
    return respond(answer, replayed=replayed)


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def read_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    return BatchOut(**batch_summary(session, get_batch(session, tenant.id, batch_id)))
