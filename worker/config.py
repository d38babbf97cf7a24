"""What the engine is given for a job: its stored parameters (``shared.params.JobParams`` dump)
turned into the engine's TransferConfig, and its input images decoded under the service's limits.

The API validated the parameters already; the engine validates again (``EngineError`` code
``invalid_config``), which fails the job permanently. ``None`` means "the engine's default" and is not
passed on, so the engine's presets stay the single source of defaults. Input images are decoded with
the limits the API inspected them with (``shared.imagecheck.image_limits``), not the engine's own
defaults, so a raised ``STYLEQUEUE_MAX_IMAGE_PIXELS`` or ``_MAX_UPLOAD_BYTES`` holds for both.
Parameters that are not valid and inputs that are missing fail the job permanently (``Failure``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypedDict

from PIL import Image
from pydantic import ValidationError

from shared import storage_keys
from shared.buckets import run_size
from shared.imagecheck import image_limits
from shared.params import JobParams, fit_long_edge
from shared.settings import Settings
from shared.storage import ObjectNotFound, Storage
from worker.engine import TransferConfig, load_image
from worker.engine.schedule import long_edges

if TYPE_CHECKING:
    from worker import jobstore

# JobParams field -> TransferConfig field, where the names differ.
_RENAMED = {"style_weights": "style_blend_weights"}
# JobParams fields that are not engine controls (they shape the saved file).
_NOT_ENGINE = {"output_format", "quality"}


class Failure(Exception):
    """A permanent failure of this job, with its code."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


class EngineInputs(TypedDict, total=False):
    """The optional inputs of ``EnginePort.run`` a job has (absent keys are not passed at all)."""

    masks: list[Image.Image]


def job_params(raw: dict[str, Any]) -> JobParams:
    """The stored params, validated again (a row written by an older API may lack new fields);
    ``Failure`` (invalid_params) naming the wrong fields when they are not valid."""
    try:
        return JobParams.model_validate(raw or {})
    except ValidationError as exc:
        raise Failure("invalid_params", f"the job's parameters are not valid: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    """Which fields are wrong and why, without pydantic's echo of the input or its links."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()[:5]
    )


def scale_edges(params: JobParams) -> list[int]:
    """The long edge of each of the job's scales, smallest first (what its progress counts)."""
    return list(params.scales or long_edges(params.size, params.min_size, params.scale_factor))


def transfer_config(params: JobParams, settings: Settings) -> TransferConfig:
    """The engine config for one job; device, weights and checkpoint cadence come from the worker."""
    engine_fields = {f.name for f in dataclasses.fields(TransferConfig)}
    values: dict[str, Any] = {}
    for name, value in params.model_dump().items():
        if name in _NOT_ENGINE or value is None:
            continue
        target = _RENAMED.get(name, name)
        if target not in engine_fields:
            continue
        values[target] = tuple(value) if isinstance(value, list) else value
    values["save_every"] = max(0, settings.checkpoint_every)
    values["max_scales"] = settings.max_scales  # the API accepted up to this many scales
    values["device"] = None  # the loaded engine's device (settings.device, see worker.runtime)
    values["weights"] = None  # the loaded engine's weights (settings.weights)
    return TransferConfig(**values)


def load_input_image(data: bytes, settings: Settings) -> Image.Image:
    """A stored input image as the engine's RGB image, refused (``ImageError``, the API's codes)
    beyond the service's per-image limits."""
    return load_image(data, **image_limits(settings))


def load_inputs(
    storage: Storage, claim: jobstore.Claim, settings: Settings
) -> tuple[Image.Image, list[Image.Image], EngineInputs]:
    """The content, the styles and the masks, decoded under the service's limits (as the API
    inspected them); ``masks`` (one per style; the engine reads their luminance) only when the job
    has masks (so an engine without the keyword still runs every other job)."""
    content = load_input_image(_input_bytes(storage, claim.content_image_id), settings)
    styles = [load_input_image(_input_bytes(storage, i), settings) for i in claim.style_image_ids]
    if not styles:
        raise Failure("invalid_params", "the job has no style image")
    masks = claim.mask_image_ids
    if not masks:
        return content, styles, {}
    return content, styles, {"masks": [load_input_image(_input_bytes(storage, m), settings) for m in masks]}


def at_run_size(
    params: JobParams, content: Image.Image, inputs: EngineInputs
) -> tuple[Image.Image, EngineInputs, tuple[int, int] | None]:
    """The content, and its masks, resized to the aspect ratio the job runs at
    (``shared.buckets.run_size``: a common ratio within 3 %, unless ``exact_aspect``), and the exact
    (w, h) the result is resized back to (None: it runs at its own aspect)."""
    exact = content.size
    run = run_size(params, exact)
    if run == exact:
        return content, inputs, None
    content = content.resize(run, Image.Resampling.LANCZOS)
    if "masks" in inputs:  # a mask keeps its resolution and takes the content's new aspect
        masks = [m.resize(fit_long_edge(run, max(m.size)), Image.Resampling.LANCZOS) for m in inputs["masks"]]
        inputs = {**inputs, "masks": masks}
    return content, inputs, exact


def _input_bytes(storage: Storage, image_id: str) -> bytes:
    try:
        return storage.get_bytes(storage_keys.image_key(image_id))
    except ObjectNotFound as exc:
        raise Failure("input_missing", f"input image {image_id} is not in storage") from exc
