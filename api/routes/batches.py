"""``/v1/batches``: many jobs in one request (contents x styles), accepted whole or not at all.

Everything is validated first; then one transaction stores the images, the batch row and all jobs
(one bulk INSERT); then every message is published over one producer (``api.submission``, the path
``POST /v1/jobs`` shares).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from api.deps import SessionDep, SubmitCtxDep, TenantDep
from api.forms import json_field
from api.imagestore import Raw
from api.job_creation import parse_params_json
from api.limits import MAX_BATCH_FILES
from api.queries import batch_summary, get_batch
from api.schemas import BATCH_DOC, BATCH_FORM, ERRORS, BatchCreated, BatchOut, BatchRequest
from api.submission import PAIRS_SHAPE, Draft, SubmitRoute, ValidSubmission, plan_jobs, submit, validated
from shared.errors import InvalidInput
from shared.settings import Settings

router = APIRouter(prefix="/v1/batches", tags=["batches"])

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
    return list(req.contents), list(req.styles), list(req.masks), req.mode, req.pairs, req.params


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
    settings: Settings,
) -> ValidSubmission:
    """The plan, the params, then every image (decoded once)."""
    plan = plan_jobs(len(contents), len(styles), mode, pairs, settings.max_batch_jobs, len(masks))
    return validated(contents, styles, masks, plan, raw_params, settings, batch=True)


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
    responses=ERRORS,
    openapi_extra=BATCH_DOC,
    summary="Submit many jobs: JSON naming image ids, or multipart files",
)
async def submit_batch(request: Request, ctx: SubmitCtxDep) -> Response:
    """With an ``Idempotency-Key`` header, a repeat of the same request answers the first
    response (header ``Idempotent-Replayed: true``) and creates nothing."""
    return await submit(request, ctx, SUBMIT_BATCH)


@router.get("/{batch_id}", response_model=BatchOut, responses=ERRORS)
def read_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    return BatchOut(**batch_summary(session, get_batch(session, tenant.id, batch_id)))
