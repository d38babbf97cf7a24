"""Response (and JSON request) models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from shared.params import JobParams

# ``params`` is validated by JobParams in api.submit (so its errors get their own codes); the schema
# shown in OpenAPI is JobParams' own, generated from the same model.
PARAMS_SCHEMA = JobParams.model_json_schema()
ParamsDict = Annotated[dict[str, Any], WithJsonSchema(PARAMS_SCHEMA)]
ImageId = Annotated[str, Field(max_length=64, description="an uploaded image's id (sha256 hex)")]
MAX_IDS = 10_000  # a hard ceiling; the configured max_batch_jobs (1,000) is checked in the route
# A batch pair: [content index, style index or list of style indexes] and, optionally, a list of
# indexes into the batch's masks, one per style of the pair (spatial control).
Pair = (tuple[StrictInt, StrictInt | list[StrictInt]]
        | tuple[StrictInt, StrictInt | list[StrictInt], list[StrictInt]])


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


class Progress(BaseModel):
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
    scale: int | None = None
    iteration: int | None = None
    step: int | None = None
    url: str | None = None
    preview_url: str | None = None


class JobOut(BaseModel):
    id: str
    status: str
    batch_id: str | None
    content_id: str
    style_ids: list[str]
    mask_ids: list[str] | None = Field(
        None, description="one content mask per style (same order), or null: no spatial control")
    params: dict[str, Any]
    progress: Progress
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorOut | None
    result_url: str | None
    checkpoints: list[CheckpointOut]


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
        "product", description="product: every content with every style; pairs: as listed")
    masks: list[ImageId] = Field(
        default_factory=list, max_length=MAX_IDS,
        description="content masks (greyscale: white = the style applies, black = not), used "
                    "by index in pairs; each must have its content's aspect ratio")
    pairs: list[Pair] | None = Field(
        None, max_length=MAX_IDS,
        description="mode pairs: [content index, style index or list of style indexes] or "
                    "[content, style(s), [mask index per style]] (indexes into masks)")
    params: ParamsDict = Field(default_factory=dict)


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_IDS = {"type": "array", "items": {"type": "string", "maxLength": 64}}


def _form_schema(files_field: str, extra: dict[str, Any], mask_doc: str) -> dict[str, Any]:
    return {"type": "object", "properties": {
        files_field: _FILES,
        "style": _FILES,
        "content_id": _IDS,
        "style_id": _IDS,
        "mask": {**_FILES, "description": f"content masks, uploaded: {mask_doc}"},
        "mask_id": {**_IDS, "description": f"content masks, by image id (after the mask "
                                           f"files): {mask_doc}"},
        "params": {"type": "string", "contentMediaType": "application/json",
                   "contentSchema": PARAMS_SCHEMA, "description": "JSON object (JobParams)"},
        **extra,
    }}


_JOB_MASKS = ("none, or one per style: mask i (files first, then ids) applies to style i "
              "(style files first, then style ids); greyscale, white = the style applies here, "
              "black = not; the content's aspect ratio")
_BATCH_MASKS = ("the batch's masks list (files first, then ids), named by index in pairs")
JOB_FORM_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": _form_schema("content", {}, _JOB_MASKS)},
}}}
BATCH_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BatchRequest.model_json_schema()},
    "multipart/form-data": {"schema": _form_schema("content", {
        "mode": {"type": "string", "enum": ["product", "pairs"]},
        "pairs": {"type": "string", "contentMediaType": "application/json",
                  "description": "JSON list of [content index, style index(es)] or [content, "
                                 "style(s), [mask index per style]]"},
    }, _BATCH_MASKS)},
}}}


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


__all__ = [
    "BATCH_DOC",
    "JOB_FORM_DOC",
    "BatchCreated",
    "BatchOut",
    "BatchRequest",
    "CheckpointOut",
    "ErrorResponse",
    "ImageOut",
    "JobErrorOut",
    "JobList",
    "JobOut",
    "Pair",
    "Progress",
    "ReadyOut",
]
