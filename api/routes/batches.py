"""``/v1/batches``: many jobs in one request (contents x styles), accepted whole or not at all.

Everything is validated first; then one transaction stores the images, the batch row and all jobs
(one bulk INSERT); then every message is published over one producer (``api.submission``, the path
``POST /v1/jobs`` shares). A batch is canceled or deleted whole, in a few set-based statements.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from api import webhook_input
from api.deps import SessionDep, StorageDep, SubmitCtxDep, TenantDep
from api.forms import json_field
from api.imagestore import Raw
from api.job_creation import parse_params_json, parse_priority
from api.limits import MAX_BATCH_FILES
from api.plans import PAIRS_SHAPE, plan_jobs
from api.presenters import with_location
from api.queries import batch_summary, get_batch
from api.routes.jobs import DeletionOut, created_doc, deletion_answer
from api.schemas import BATCH_DOC, BATCH_FORM, ERRORS, BatchCreated, BatchOut, BatchRequest
from api.submission import Draft, SubmitRoute, ValidSubmission, submit, validated
from shared import jobstore_deletion, retention
from shared.audit import audit
from shared.errors import InvalidInput
from shared.settings import Settings
from shared.webhooks import BATCH_EVENTS

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# contents, styles, masks, mode, pairs, params, priority, webhook (url, events filter)
Parsed = tuple[
    list[Raw], list[Raw], list[Raw], str, Any, dict[str, Any], int, tuple[str | None, list[str] | None]
]


def _from_json(body: Any, settings: Settings) -> Parsed:
    try:
        req = BatchRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        where = tuple(err.get("loc", ()))
        if where[:1] == ("pairs",) and len(where) > 1:  # one pair (not the list) is malformed
            raise InvalidInput("invalid_pairs", f"pairs.{where[1]}: {PAIRS_SHAPE}") from None
        if where[:1] == ("webhook_events_filter",):
            raise InvalidInput(
                "invalid_webhook_events", f"webhook_events_filter: one or more of {', '.join(BATCH_EVENTS)}"
            ) from None
        loc = ".".join(str(x) for x in where)[:100]
        code = {"extra_forbidden": "unknown_field", "too_long": "batch_too_large"}.get(
            str(err.get("type")), "invalid_request"
        )
        raise InvalidInput(code, f"{loc}: {err.get('msg')}") from None
    for name, ids in (("contents", req.contents), ("styles", req.styles), ("masks", req.masks)):
        if len(ids) > settings.max_batch_jobs:
            raise InvalidInput(
                "batch_too_large",
                f"{len(ids)} {name}; the maximum is "
                f"{settings.max_batch_jobs} (a batch has at most that many jobs)",
            )
    return (
        list(req.contents),
        list(req.styles),
        list(req.masks),
        req.mode,
        req.pairs,
        req.params,
        req.priority,
        (req.webhook, None if req.webhook_events_filter is None else list(req.webhook_events_filter)),
    )


def _check_counts(n_contents: int, n_styles: int, n_masks: int, settings: Settings) -> None:
    for name, count in (("contents", n_contents), ("styles", n_styles), ("masks", n_masks)):
        if count > settings.max_batch_jobs:
            raise InvalidInput("batch_too_large", f"{count} {name}; the maximum is {settings.max_batch_jobs}")


def _planned(
    contents: list[Raw],
    styles: list[Raw],
    masks: list[Raw],
    mode: str,
    pairs: Any,
    raw_params: dict[str, Any],
    priority: int,
    webhook: tuple[str | None, list[str] | None],
    settings: Settings,
) -> ValidSubmission:
    """The plan, the params, the webhook, then every image (decoded once)."""
    plan = plan_jobs(len(contents), len(styles), mode, pairs, settings.max_batch_jobs, len(masks))
    hook = webhook_input.parsed(*webhook, settings, batch=True)
    return validated(
        contents, styles, masks, plan, raw_params, settings, batch=True, priority=priority, webhook=hook
    )


def _validate_form(draft: Draft, settings: Settings) -> ValidSubmission:
    pairs = json_field(draft.texts["pairs"], "pairs")
    raw_params = parse_params_json(draft.texts["params"])
    return _planned(
        draft.contents,
        draft.styles,
        draft.masks,
        draft.texts["mode"] or "product",
        pairs,
        raw_params,
        parse_priority(draft.texts["priority"]),
        (draft.texts["webhook"], webhook_input.parse_events_field(draft.texts["webhook_events_filter"])),
        settings,
    )


def _validate_json(body: Any, settings: Settings) -> ValidSubmission:
    return _planned(*_from_json(body, settings), settings)


SUBMIT_BATCH = SubmitRoute(
    form=BATCH_FORM,
    max_files=lambda _settings: MAX_BATCH_FILES,
    check_counts=_check_counts,
    validate=_validate_form,
    validate_json=_validate_json,
)


@router.post(
    "",
    status_code=202,
    response_model=BatchCreated,
    responses=created_doc("batch"),
    openapi_extra=BATCH_DOC,
    summary="Submit many jobs: JSON naming image ids, or multipart files",
)
async def submit_batch(request: Request, ctx: SubmitCtxDep) -> Response:
    """With an ``Idempotency-Key`` header, a repeat of the same request answers the first
    response (header ``Idempotent-Replayed: true``) and creates nothing. ``Location``: the batch."""
    return with_location(await submit(request, ctx, SUBMIT_BATCH), ctx.settings, "/v1/batches")


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def read_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    return BatchOut(**batch_summary(session, get_batch(session, tenant.id, batch_id)))


class BatchCancelOut(BaseModel):
    canceled: int  # queued: canceled at once
    cancel_requested: int  # running: asked to stop (their workers cancel them within seconds)
    already_finished: int


@router.post("/{batch_id}/cancel", response_model=BatchCancelOut, responses=ERRORS, summary="Cancel a batch")
def cancel_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchCancelOut:
    """Cancels the batch's queued jobs at once and asks its running ones to stop."""
    get_batch(session, tenant.id, batch_id)
    counts = jobstore_deletion.cancel_batch(session, tenant.id, batch_id)
    session.commit()
    audit(
        "cancel_batch", tenant_id=tenant.id, key_prefix=tenant.key_prefix, batch_id=batch_id, **vars(counts)
    )
    return BatchCancelOut(**vars(counts))


@router.delete(
    "/{batch_id}",
    status_code=204,
    response_class=Response,
    responses={**ERRORS, 202: {"model": DeletionOut, "description": "deleted once its running jobs stopped"}},
    summary="Delete a batch and its jobs: 204 done, 202 while running jobs stop",
)
def delete_batch(batch_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> Response:
    """Every job of the batch is deleted as ``DELETE /v1/jobs/{id}`` deletes one, then the batch."""
    get_batch(session, tenant.id, batch_id)
    done = retention.delete_jobs(session, storage, tenant.id, batch_id=batch_id)
    audit(
        "delete_batch",
        tenant_id=tenant.id,
        key_prefix=tenant.key_prefix,
        batch_id=batch_id,
        running=done.running,
    )
    return deletion_answer(batch_id, done)
