"""Job creation (the steps under api/submission.py): params checked against the limits, job rows
inserted in bulk, published after commit.

The job rows are committed BEFORE any message is published (the task id is the job id); then one
dispatch pass publishes what fits in the free slots. If the broker fails after the commit, the jobs
wait in the table for the dispatcher's next pass, and the request still succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.forms import MAX_FIELD_BYTES
from api.publisher import Publisher
from api.safejson import loads
from api.schemas import PRIORITY_LIMIT
from api.webhook_input import WebhookRequest
from shared import dispatch, jobstore, logs, quotas
from shared.buckets import bucket_key, groupable
from shared.db import is_db_outage
from shared.errors import InvalidInput
from shared.jobstore import JobSpec
from shared.models import StoredImage
from shared.params import JobParams
from shared.settings import Settings

logger = logging.getLogger(__name__)

_CODES = {"extra_forbidden": "unknown_parameter", "too_many_scales": "too_many_scales"}


def parse_params_json(raw: str | None) -> dict[str, Any]:
    """The ``params`` form field: a JSON object, or empty for the defaults."""
    if raw is None or not raw.strip():
        return {}
    value = loads(raw, what="params", max_bytes=MAX_FIELD_BYTES)
    if not isinstance(value, dict):
        raise InvalidInput("malformed_params", "params must be a JSON object", malformed=True)
    return value


def parse_priority(raw: str | None) -> int:
    """The ``priority`` form field: an integer within ±PRIORITY_LIMIT, or empty for 0."""
    if raw is None or not raw.strip():
        return 0
    text = raw.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 3) or abs(int(text)) > PRIORITY_LIMIT:
        raise InvalidInput(
            "invalid_priority", f"priority must be an integer from -{PRIORITY_LIMIT} to {PRIORITY_LIMIT}"
        )
    return int(text)


def params_error(exc: ValidationError) -> InvalidInput:
    err = exc.errors(include_input=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))[:100]
    code = _CODES.get(str(err.get("type")), "invalid_parameter")
    if code == "unknown_parameter":
        allowed = ", ".join(sorted(JobParams.model_fields))
        return InvalidInput(code, f"unknown parameter {loc!r}; allowed: {allowed}", parameter=loc)
    where = f"params.{loc}" if loc else "params"
    return InvalidInput(code, f"{where}: {err.get('msg')}", parameter=loc or None)


def validate_params(
    raw: dict[str, Any], settings: Settings, style_counts: Sequence[int], regions: int = 1
) -> JobParams:
    """Validate ``params`` and the configured limits for jobs with these numbers of styles
    (``regions``: the most style regions a job has, its styles when masked; JobParams.work)."""
    try:
        params = JobParams.model_validate(raw)
    except ValidationError as exc:
        raise params_error(exc) from None
    if params.largest_size() > settings.max_size:
        raise InvalidInput(
            "size_too_large",
            f"size {params.largest_size()} is above the maximum {settings.max_size}",
        )
    style_edge = params.style_scale * params.largest_size()
    if style_edge > settings.max_size:
        raise InvalidInput(
            "size_too_large",
            f"style_scale {params.style_scale:g} makes the styles {style_edge:.0f} px at the "
            f"largest scale; the maximum is {settings.max_size}: lower style_scale or size",
        )
    scales = params.scale_count()
    if scales > settings.max_scales:
        raise InvalidInput(
            "too_many_scales",
            f"{scales} scales; the maximum is {settings.max_scales}: "
            "raise scale_factor or min_size, or list fewer scales",
        )
    total = params.total_iterations()
    if total > settings.max_iterations:
        raise InvalidInput(
            "too_many_iterations",
            f"{total} iterations in all scales; the maximum is {settings.max_iterations}",
        )
    work = params.work(regions)
    if work > settings.max_job_work:
        raise InvalidInput(
            "too_much_work",
            f"the job asks for {work:.3g} pixel-iterations (sum over scales of long "
            f"edge squared x iterations); the maximum is {settings.max_job_work:.3g}: "
            "use fewer iterations or a smaller size",
        )
    for count in sorted(set(style_counts)):
        if count > settings.max_styles:
            raise InvalidInput("too_many_styles", f"{count} styles; the maximum is {settings.max_styles}")
        if params.style_weights is not None and len(params.style_weights) != count:
            raise InvalidInput(
                "style_weights_mismatch",
                f"{len(params.style_weights)} style_weights for {count} style image(s)",
            )
    return params


def check_runnable(
    params: JobParams, contents_wh: Sequence[tuple[int, int]], styles_wh: Sequence[tuple[int, int]]
) -> None:
    """Refuse images the engine could not run at some scale (a side under 16 px), up front."""
    why = params.narrow_reason(contents_wh, styles_wh)
    if why is not None:
        raise InvalidInput("image_too_narrow", f"{why}: use a less extreme aspect ratio or a larger min_size")


def insert_jobs(
    session: Session,
    *,
    tenant_id: str,
    batch_id: str | None,
    specs: Sequence[JobSpec],
    params: JobParams,
    settings: Settings,
    priority: int = 0,
    admitted: bool = False,
    webhook: WebhookRequest | None = None,
) -> list[str]:
    """Admit the jobs under the tenant's quotas (``shared.quotas``: refused, nothing is created;
    ``admitted``: the caller did, with ``admit_jobs``, before it stored anything), then bulk-insert
    them queued (one statement); the caller commits. Returns their ids in order."""
    costs = [job_cost(params, spec) for spec in specs]
    if not admitted:
        quotas.admit(session, tenant_id, costs, settings)
    specs = with_buckets(session, specs, params)
    return jobstore.insert_queued(
        session,
        tenant_id=tenant_id,
        batch_id=batch_id,
        specs=specs,
        params=params.model_dump(mode="json"),
        max_attempts=settings.max_attempts,
        costs=costs,
        priority=priority,
        webhook=webhook.url if webhook else None,
        webhook_events=list(webhook.events) if webhook else None,
    )


def with_buckets(session: Session, specs: Sequence[JobSpec], params: JobParams) -> list[JobSpec]:
    """Each spec with its bucket (``shared.buckets``), from its content's stored size (one query)."""
    if not groupable(params):
        return list(specs)
    ids = sorted({spec.content_id for spec in specs})
    rows = session.execute(
        select(StoredImage.id, StoredImage.width, StoredImage.height).where(StoredImage.id.in_(ids))
    )
    sizes = {image_id: (int(w), int(h)) for image_id, w, h in rows}
    return [
        replace(spec, bucket=bucket_key(params, sizes[spec.content_id])) if spec.content_id in sizes else spec
        for spec in specs
    ]


def admit_jobs(
    session: Session, tenant_id: str, specs: Sequence[JobSpec], params: JobParams, settings: Settings
) -> None:
    """The quotas' check and charge of these jobs (``shared.quotas.admit``), for a caller that must
    refuse before it writes objects to storage (which a rollback does not undo)."""
    quotas.admit(session, tenant_id, [job_cost(params, spec) for spec in specs], settings)


def job_cost(params: JobParams, spec: JobSpec) -> int:
    """What a job costs a worker: pixels x iterations (a masked job has a style region per style)."""
    return params.work(len(spec.style_ids) if spec.mask_ids is not None else 1)


def dispatch_after_commit(
    factory: sessionmaker[Session], publisher: Publisher, settings: Settings, job_ids: Sequence[str]
) -> list[str]:
    """The jobs are committed and wait in the table; one dispatch pass (``shared.dispatch``) now
    publishes what fits in the free worker slots, in fair order (these jobs, or other tenants'
    waiting ones), so an idle system starts a job at once. Returns the ids published.

    A database outage now must not turn the answer into an error: the jobs are committed, and the
    dispatcher's next pass publishes them.
    """
    try:
        published = dispatch.dispatch_once(factory, publisher.publish, settings).published
    except Exception as exc:
        if not is_db_outage(exc):
            raise
        logs.event(
            logger,
            "dispatch_failed",
            job_id=job_ids[0] if job_ids else None,
            level=logging.ERROR,
            jobs=len(job_ids),
            error=type(exc).__name__,
        )
        published = []
    logs.event(
        logger,
        "submitted",
        job_id=job_ids[0] if job_ids else None,
        jobs=len(job_ids),
        published=len(set(published) & set(job_ids)),
    )
    return published


__all__ = [
    "JobSpec",
    "admit_jobs",
    "check_runnable",
    "insert_jobs",
    "params_error",
    "parse_params_json",
    "parse_priority",
    "dispatch_after_commit",
    "validate_params",
]
