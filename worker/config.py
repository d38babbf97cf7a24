"""What the engine is given for a job: its stored parameters (``shared.params.JobParams`` dump)
turned into the engine's TransferConfig, and its input images decoded under the service's limits.

The API validated the parameters already; the engine validates again (``EngineError`` code
``invalid_config``), which fails the job permanently. ``None`` means "the engine's default" and is not
passed on, so the engine's presets stay the single source of defaults. Input images are decoded with
the limits the API inspected them with (``shared.imagecheck.image_limits``), not the engine's own
defaults, so a raised ``STYLEQUEUE_MAX_IMAGE_PIXELS`` or ``_MAX_UPLOAD_BYTES`` holds for both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from shared.imagecheck import image_limits
from shared.params import JobParams
from shared.settings import Settings
from worker.engine import TransferConfig, load_image

# JobParams field -> TransferConfig field, where the names differ.
_RENAMED = {"style_weights": "style_blend_weights"}
# JobParams fields that are not engine controls (they shape the saved file).
_NOT_ENGINE = {"output_format", "quality"}


def job_params(raw: dict[str, Any]) -> JobParams:
    """The stored params, validated again (a row written by an older API may lack new fields)."""
    return JobParams.model_validate(raw or {})


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
