"""The HTTP API's models: responses, the JSON batch request, the multipart forms, the error answers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from api.status_schemas import ExecutionOut, QueueOut
from shared.params import JobParams

# ``params`` is validated by JobParams in api.job_creation (so its errors get their own codes); the schema
# shown in OpenAPI is JobParams' own, generated from the same model.
PARAMS_SCHEMA = JobParams.model_json_schema()
ParamsDict = Annotated[dict[str, Any], WithJsonSchema(PARAMS_SCHEMA)]
ImageId = Annotated[str, Field(max_length=64, description="an uploaded image's id (sha256 hex)")]
MAX_IDS = 10_000  # a hard ceiling; the configured max_batch_jobs (1,000) is checked in the route
PRIORITY_LIMIT = 100  # a job's priority within its tenant's line: -100..100
# A batch pair: [content index, style index or list of style indexes] and, optionally, a list of
# indexes into the batch's masks, one per style of the pair (spatial control).
Pair = (
    tuple[StrictInt, StrictInt | list[StrictInt]]
    | tuple[StrictInt, StrictInt | list[StrictInt], list[StrictInt]]
)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageOut(BaseModel):
    id: str = Field(description="sha256 of the bytes")
    format: str
    width: int
    height: int
    bytes: int


class ProgressOut(BaseModel):
    scale: int | None = None
    scales: int | None = None
    iteration: int | None = None
    iterations: int | None = None
    fraction: float = 0.0
    loss: float | None = None
    eta_seconds: float | None = None


class JobErrorOut(BaseModel):
    code: str
    message: str
    retryable: bool | None = None


class CheckpointOut(BaseModel):
    scale: int | None = Field(None, description="0-based: the first scale is 0")
    iteration: int | None = Field(None, description="iterations done within its scale")
    step: int | None = Field(
        None, description="iterations done in all scales; names it: /v1/jobs/{id}/checkpoints/{step}"
    )
    url: str | None = None
    preview_url: str | None = None
    thumb_url: str | None = Field(
        None, description="its preview as a small JPEG (long edge at most 256 px); null for older jobs"
    )


class JobOut(BaseModel):
    id: str
    status: str
    batch_id: str | None
    content_id: str
    style_ids: list[str]
    mask_ids: list[str] | None = Field(
        None, description="one content mask per style (same order), or null: no spatial control"
    )
    params: dict[str, Any]
    priority: int = Field(0, description="within your line: higher runs first")
    progress: ProgressOut
    attempts: int = Field(
        description="attempts that counted against the limit (STYLEQUEUE_MAX_ATTEMPTS): runs started, "
        "less those handed back (a worker's shutdown, a transient error), which do not count"
    )
    handed_back: int = Field(0, description="runs handed back to the queue and resumed: not counted")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorOut | None
    result_url: str | None
    result_thumb_url: str | None = Field(
        None, description="the result as a small JPEG (long edge at most 256 px); null for older jobs"
    )
    checkpoints: list[CheckpointOut]
    queue: QueueOut | None = Field(None, description="queued jobs only: position in your line, ETA")
    execution: ExecutionOut | None = Field(None, description="succeeded jobs: how it was run")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class BatchCreated(BaseModel):
    id: str
    job_count: int
    job_ids: list[str]


class BatchOut(BaseModel):
    id: str
    job_count: int
    counts: dict[str, int]
    progress: float = Field(description="overall fraction done, finished jobs counting as 1")
    done: bool
    params: dict[str, Any]
    created_at: datetime
    job_ids: list[str]


class BatchRequest(BaseModel):
    """JSON body of ``POST /v1/batches`` naming uploaded image ids."""

    model_config = ConfigDict(extra="forbid")

    contents: list[ImageId] = Field(min_length=1, max_length=MAX_IDS)
    styles: list[ImageId] = Field(min_length=1, max_length=MAX_IDS)
    mode: Literal["product", "pairs"] = Field(
        "product", description="product: every content with every style; pairs: as listed"
    )
    masks: list[ImageId] = Field(
        default_factory=list,
        max_length=MAX_IDS,
        description="content masks (greyscale: white = the style applies, black = not), used "
        "by index in pairs; each must have its content's aspect ratio",
    )
    pairs: list[Pair] | None = Field(
        None,
        max_length=MAX_IDS,
        description="mode pairs: [content index, style index or list of style indexes] or "
        "[content, style(s), [mask index per style]] (indexes into masks)",
    )
    params: ParamsDict = Field(default_factory=dict)
    priority: int = Field(
        0,
        ge=-PRIORITY_LIMIT,
        le=PRIORITY_LIMIT,
        strict=True,
        description="within this tenant's share: higher runs first (never ahead of other tenants)",
    )
    webhook: str | None = Field(
        None, max_length=2048, description="an https URL: its events are POSTed there, signed"
    )
    webhook_events_filter: list[Literal["start", "checkpoint", "completed", "batch.completed"]] | None = (
        Field(None, max_length=8, description="default: completed and batch.completed")
    )


# Multipart requests, declared once: the allowed-field check (api.forms.check_fields), the reader
# (api.submission.read_draft) and the OpenAPI schema (request_body) all work from these specs. The
# routes parse the form themselves (FastAPI's Form/File parsing would bypass api.forms' streaming
# limits and timeout, and read the body before authentication).
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_IDS = {"type": "array", "items": {"type": "string", "maxLength": 64}}


@dataclass(frozen=True)
class ImageField:
    """One image slot of a form: files uploaded in ``name``, ids of uploaded images in ``name_id``
    (the files first, then the ids)."""

    name: str
    what: str  # what the images are (OpenAPI)
    rule: str | None = None  # how they are used (OpenAPI)
    single: bool = False  # one image: errors name it ``content``, not ``content[0]``

    @property
    def id_name(self) -> str:
        return f"{self.name}_id"

    def label(self, index: int) -> str:
        return self.name if self.single else f"{self.name}[{index}]"

    def properties(self) -> dict[str, Any]:
        rule = f": {self.rule}" if self.rule else ""
        return {
            self.name: {**_FILES, "description": f"{self.what}, uploaded{rule}"},
            self.id_name: {
                **_IDS,
                "description": f"{self.what}, by image id (after the {self.name} files){rule}",
            },
        }


@dataclass(frozen=True)
class TextField:
    """A text field of a form (JSON is sent as text); the last non-empty value counts."""

    name: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class FormSpec:
    """A multipart submission: its content, style and mask slots and its text fields."""

    content: ImageField
    style: ImageField
    mask: ImageField
    texts: tuple[TextField, ...]
    name_fields_in_errors: bool = False  # an unknown field's error lists the allowed ones

    @property
    def images(self) -> tuple[ImageField, ImageField, ImageField]:
        return self.content, self.style, self.mask

    def names(self) -> list[str]:
        return sorted([*(n for f in self.images for n in (f.name, f.id_name)), *(t.name for t in self.texts)])

    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for image in self.images:
            properties.update(image.properties())
        return {"type": "object", "properties": {**properties, **{t.name: t.schema for t in self.texts}}}


def request_body(form: FormSpec, json_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses its own body: the form (and a JSON alternative)."""
    content = {"multipart/form-data": {"schema": form.schema()}}
    if json_model is not None:
        content = {"application/json": {"schema": json_model.model_json_schema()}, **content}
    return {"requestBody": {"required": True, "content": content}}


_JSON = {"type": "string", "contentMediaType": "application/json"}
PARAMS_FIELD = TextField(
    "params", {**_JSON, "contentSchema": PARAMS_SCHEMA, "description": "JSON object (JobParams)"}
)
PRIORITY_FIELD = TextField(
    "priority",
    {
        "type": "string",
        "pattern": "^-?[0-9]{1,3}$",
        "description": f"integer -{PRIORITY_LIMIT}..{PRIORITY_LIMIT}, default 0: within this tenant's "
        "share, higher runs first (never ahead of other tenants)",
    },
)
WEBHOOK_FIELD = TextField(
    "webhook",
    {"type": "string", "maxLength": 2048, "description": "an https URL: the job's events are POSTed there"},
)
WEBHOOK_EVENTS_FIELD = TextField(
    "webhook_events_filter",
    {
        "type": "string",
        "description": "events to send, comma-separated or a JSON list: start, checkpoint, completed "
        "(default completed; batches also batch.completed, in their default)",
    },
)
_JOB_MASKS = (
    "none, or one per style: mask i (files first, then ids) applies to style i "
    "(style files first, then style ids); greyscale, white = the style applies here, "
    "black = not; the content's aspect ratio"
)
_BATCH_MASKS = "the batch's masks list (files first, then ids), named by index in pairs"
JOB_FORM = FormSpec(
    ImageField("content", "the content image (one)", single=True),
    ImageField("style", "the style images"),
    ImageField("mask", "content masks", _JOB_MASKS),
    (PARAMS_FIELD, PRIORITY_FIELD, WEBHOOK_FIELD, WEBHOOK_EVENTS_FIELD),
    name_fields_in_errors=True,
)
BATCH_FORM = FormSpec(
    ImageField("content", "the content images"),
    ImageField("style", "the style images"),
    ImageField("mask", "content masks", _BATCH_MASKS),
    (
        PARAMS_FIELD,
        PRIORITY_FIELD,
        WEBHOOK_FIELD,
        WEBHOOK_EVENTS_FIELD,
        TextField("mode", {"type": "string", "enum": ["product", "pairs"]}),
        TextField(
            "pairs",
            {
                **_JSON,
                "description": "JSON list of [content index, style index(es)] "
                "or [content, style(s), [mask index per style]]",
            },
        ),
    ),
)
JOB_FORM_DOC = request_body(JOB_FORM)
BATCH_DOC = request_body(BATCH_FORM, BatchRequest)
# The error answers every route may give (400 malformed, 401, 404, 409, 413, 422 invalid, 503).
ERRORS: dict[int | str, dict[str, object]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
    workers: dict[str, int] | None = Field(None, description="healthy/unhealthy workers (not required)")


__all__ = [
    "BATCH_DOC",
    "BATCH_FORM",
    "ERRORS",
    "PRIORITY_LIMIT",
    "JOB_FORM",
    "JOB_FORM_DOC",
    "BatchCreated",
    "BatchOut",
    "BatchRequest",
    "CheckpointOut",
    "ErrorResponse",
    "FormSpec",
    "ImageField",
    "ImageOut",
    "JobErrorOut",
    "JobList",
    "JobOut",
    "Pair",
    "ProgressOut",
    "ReadyOut",
    "TextField",
    "request_body",
]
