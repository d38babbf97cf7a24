"""A job's inputs: decoded and prepared per item (prepare_items, load_masks), checked to share one
schedule (batch_schedule), and sized once per job (shrink_inputs).

Sizing: each content and style is shrunk to the largest size any scale needs.

Content and styles arrive at full resolution (up to 40 MP); resizing them at every scale of every
job is CPU work proportional to the original's pixels. They are shrunk once (bicubic, antialiased:
images.resize) before the scale loop, and each scale resizes from that copy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checks import normalise_blend
from .config import BatchItem, TransferConfig, item_loss_weights
from .errors import EngineError
from .images import load_image, pil_to_tensor, resize
from .items import PreparedItem, prepare_item
from .schedule import Schedule, build_schedule, check_runnable, style_size
from .weights import Weights


def hw_of(t: torch.Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])


def shrink_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """x resized to ``hw`` if that is smaller on both sides, else x itself (never enlarged)."""
    if hw[0] < x.shape[-2] and hw[1] < x.shape[-1]:
        return resize(x, hw)
    return x


def shrink_inputs(
    items: Sequence[PreparedItem], schedule: Schedule, style_scale: float, upscale: bool
) -> list[PreparedItem]:
    """Each item with its content (and colour original, and masks) at most the largest scale's size and each
    style at most its size at that scale (schedule.style_size); ``style_hws`` keeps the styles'
    native sizes, from which every scale's style size is still computed."""
    top = max((hw for hw, _ in schedule), key=max)
    out = []
    for it in items:
        natives = it.style_hws or [hw_of(s) for s in it.styles]
        styles = [
            shrink_to(s, style_size(hw, top, style_scale, upscale=upscale))
            for s, hw in zip(it.styles, natives, strict=True)
        ]
        content = shrink_to(it.content, top)
        original = content if it.original is it.content else shrink_to(it.original, top)
        masks = None if it.masks is None else [shrink_to(m, top) for m in it.masks]
        out.append(
            replace(it, content=content, original=original, styles=styles, style_hws=natives, masks=masks)
        )
    return out


def prepare_items(
    items: Sequence[BatchItem], config: TransferConfig, weights: Weights
) -> tuple[list[PreparedItem], list[Any]]:
    preset = config.loss_weights(weights.kind)
    prepared, parts = [], []
    for item in items:
        content = load_image(item.content)
        styles = [load_image(s) for s in (item.styles or [])]
        if not styles:
            raise EngineError("invalid_config", "give at least one style image")
        blend = normalise_blend(item.style_blend_weights or config.style_blend_weights, len(styles))
        w = item_loss_weights(item, preset)
        masks = load_masks(item.masks, len(styles), (content.height, content.width))
        p = prepare_item(pil_to_tensor(content), [pil_to_tensor(s) for s in styles], blend, w, config.color)
        style_hashes = [_hash(s) for s in styles]
        # a style's statistics depend on the content too when colour modes adapt it to the content
        keys = style_hashes if config.color == "none" else [f"{h}/{_hash(content)}" for h in style_hashes]
        prepared.append(replace(p, masks=None if masks is None else [m for m, _ in masks], style_keys=keys))
        parts.append(
            [
                _hash(content),
                style_hashes,
                blend,
                list(w),
                None if masks is None else [h for _, h in masks],
            ]
        )
    return prepared, parts


def load_masks(
    masks: Sequence[Any] | None, n_styles: int, content_hw: tuple[int, int]
) -> list[tuple[torch.Tensor, str]] | None:
    """Each mask as a (1, 1, h, w) luminance tensor in [0, 1], with its hash; refused
    (``invalid_mask``) unless there is one per style, each with the content's aspect ratio within
    MASK_ASPECT_TOLERANCE (the API applies the same rule from the uploads' headers)."""
    if masks is None:
        return None
    if len(masks) != n_styles:
        raise EngineError(
            "invalid_mask", f"{len(masks)} masks given for {n_styles} styles; give one mask per style"
        )
    out = []
    for k, source in enumerate(masks, start=1):
        im = load_image(source).convert("L")
        if abs(math.log((im.width / im.height) / (content_hw[1] / content_hw[0]))) > MASK_ASPECT_TOLERANCE:
            raise EngineError(
                "invalid_mask",
                f"mask {k} is {im.width}x{im.height} px, the content {content_hw[1]}x{content_hw[0]} "
                "px: a mask must have the content's aspect ratio",
            )
        arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float().div_(255)
        if not arr.any():
            raise EngineError(
                "invalid_mask",
                f"mask {k} is black everywhere: its style would apply "
                "nowhere; white marks where a style applies",
            )
        out.append((arr[None, None], _hash(im)))
    return out


# A mask may differ from its content's aspect ratio by 2 % (|log ratio|; it is resized to the content):
# the same rule as the API's (api/masks.py), which checks it from the upload's header.
MASK_ASPECT_TOLERANCE = 0.02


def _hw(t: torch.Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])


def _hash(im: Image.Image) -> str:
    return hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()[:16]


def batch_schedule(prepared: list[PreparedItem], config: TransferConfig) -> Schedule:
    schedules = [
        build_schedule(
            _hw(p.content),
            size=config.size,
            min_size=config.min_size,
            scale_factor=config.scale_factor,
            scales=config.scales,
            iterations=config.iterations,
            max_scales=config.max_scales,
            optimizer=config.optimizer,
        )
        for p in prepared
    ]
    for p, schedule in zip(prepared, schedules, strict=True):  # styles too small at some scale
        check_runnable(
            [hw for hw, _ in schedule],
            [_hw(s) for s in p.styles],
            config.style_scale,
            upscale=config.style_upscale,
        )
    if any(s != schedules[0] for s in schedules):
        sizes = sorted({str(s[-1][0]) for s in schedules})
        raise EngineError(
            "batch_shape_mismatch",
            f"batch items must have the same aspect ratio (output sizes {', '.join(sizes)}); "
            "run them as separate jobs",
        )
    return schedules[0]
