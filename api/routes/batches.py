"""``/v1/batches``: many jobs in one request (contents x styles), accepted whole or not at all.

Everything is validated first; then one transaction stores the images, the batch row and all jobs
(one bulk INSERT); then every message is published over one producer.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData

from api.deps import PublisherDep, SessionDep, SettingsDep, StorageDep, TenantCtx, TenantDep
from api.forms import files, json_field, read_form, read_upload, text, texts
from api.imagestore import PendingImage, check_owned, persist_images, validate_upload
from api.limits import MAX_BATCH_FILES
from api.publisher import Publisher
from api.queries import batch_summary, get_batch
from api.routes.jobs import ERRORS
from api.schemas import BatchCreated, BatchOut, BatchRequest
from api.submit import JobSpec, insert_jobs, parse_params_json, publish_and_mark, validate_params
from shared.db import get_sessionmaker
from shared.errors import InvalidInput
from shared.models import Batch, new_id, utcnow
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import Storage

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["batches"])

Plan = list[tuple[int, tuple[int, ...]]]  # (content index, style indexes) per job
Item = PendingImage | str
_PAIRS = TypeAdapter(list[tuple[int, int | list[int]]])
BATCH_FIELDS = {"content", "style", "content_id", "style_id", "params", "mode", "pairs"}


def plan_jobs(n_contents: int, n_styles: int, mode: str, pairs: Any, max_jobs: int) -> Plan:
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
        return [(c, (s,)) for c in range(n_contents) for s in range(n_styles)]
    try:
        parsed = _PAIRS.validate_python(pairs if pairs is not None else [])
    except ValidationError:
        raise InvalidInput("invalid_pairs", "pairs must be a list of [content, style]") from None
    if not parsed:
        raise InvalidInput("invalid_pairs", "mode 'pairs' needs a non-empty pairs list")
    if len(parsed) > max_jobs:
        raise InvalidInput("batch_too_large", f"{len(parsed)} jobs; the maximum is {max_jobs}")
    plan: Plan = []
    for c, s in parsed:
        styles = (s,) if isinstance(s, int) else tuple(s)
        if not 0 <= c < n_contents or not styles or any(not 0 <= x < n_styles for x in styles):
            raise InvalidInput(
                "invalid_pairs",
                f"pair [{c}, {s}] is out of range: {n_contents} contents, {n_styles} styles",
            )
        plan.append((c, styles))
    return plan


async def _from_json(request: Request) -> tuple[list[Any], list[Any], str, Any, dict[str, Any]]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("malformed_json", "the body is not valid JSON", malformed=True) from None
    try:
        req = BatchRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        code = "unknown_field" if err.get("type") == "extra_forbidden" else "invalid_request"
        raise InvalidInput(code, f"{loc}: {err.get('msg')}") from None
    return list(req.contents), list(req.styles), req.mode, req.pairs, req.params


def _from_form(form: FormData) -> tuple[list[Any], list[Any], str, Any, dict[str, Any]]:
    """Contents: uploaded ``content`` files then ``content_id`` values (same for styles)."""
    unknown = sorted(set(form.keys()) - BATCH_FIELDS)
    if unknown:
        raise InvalidInput("unknown_field", f"unknown form field {unknown[0]!r}")
    contents: list[Any] = [*files(form, "content"), *texts(form, "content_id")]
    styles: list[Any] = [*files(form, "style"), *texts(form, "style_id")]
    pairs = json_field(text(form, "pairs"), "pairs")
    raw_params = parse_params_json(text(form, "params"))
    return contents, styles, text(form, "mode") or "product", pairs, raw_params


async def _read_items(items: list[Any], settings: Settings, name: str) -> list[Item]:
    out: list[Item] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        else:
            field = f"{name}[{i}]"
            out.append(validate_upload(await read_upload(item, settings, field), settings,
                                       field=field))
    return out


def _create_batch(settings: Settings, storage: Storage, publisher: Publisher, tenant: TenantCtx,
                  contents: list[Item], styles: list[Item], plan: Plan,
                  params: JobParams) -> BatchCreated:
    def ident(item: Item) -> str:
        return item if isinstance(item, str) else item.id

    factory = get_sessionmaker(settings.database_url)
    items = contents + styles
    specs = [JobSpec(ident(contents[c]), tuple(ident(styles[s]) for s in ss)) for c, ss in plan]
    with factory() as session:
        check_owned(session, tenant.id, [i for i in items if isinstance(i, str)])
        persist_images(session, storage, tenant.id, [i for i in items if not isinstance(i, str)])
        batch = Batch(id=new_id(), tenant_id=tenant.id, params=params.model_dump(mode="json"),
                      job_count=len(specs), created_at=utcnow())
        session.add(batch)
        session.flush()
        job_ids = insert_jobs(session, tenant_id=tenant.id, batch_id=batch.id, specs=specs,
                              params=params, settings=settings)
        session.commit()
    logger.info("job_event job_id=%s event=batch_created batch_id=%s jobs=%d",
                job_ids[0], batch.id, len(job_ids))
    publish_and_mark(factory, publisher, job_ids)
    return BatchCreated(id=batch.id, job_count=len(job_ids), job_ids=job_ids)


@router.post("", status_code=202, response_model=BatchCreated, responses=ERRORS,
             summary="Submit many jobs: JSON naming image ids, or multipart files")
async def submit_batch(request: Request, settings: SettingsDep, tenant: TenantDep,
                       storage: StorageDep, publisher: PublisherDep) -> BatchCreated:
    form: FormData | None = None
    if request.headers.get("content-type", "").startswith("application/json"):
        contents, styles, mode, pairs, raw = await _from_json(request)
    else:
        form = await read_form(request, max_files=MAX_BATCH_FILES)
    try:
        if form is not None:
            contents, styles, mode, pairs, raw = _from_form(form)
        plan = plan_jobs(len(contents), len(styles), mode, pairs, settings.max_batch_jobs)
        params = validate_params(raw, settings, [len(ss) for _, ss in plan])
        contents = await _read_items(contents, settings, "content")
        styles = await _read_items(styles, settings, "style")
    finally:
        if form is not None:
            await form.close()
    return await run_in_threadpool(
        _create_batch, settings, storage, publisher, tenant, contents, styles, plan, params
    )


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def read_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    return BatchOut(**batch_summary(session, get_batch(session, tenant.id, batch_id)))
