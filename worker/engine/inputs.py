"""Inputs sized once per job: each content and style shrunk to the largest size any scale needs.

Content and styles arrive at full resolution (up to 40 MP); resizing them at every scale of every
job is CPU work proportional to the original's pixels. They are shrunk once (bicubic, antialiased:
images.resize) before the scale loop, and each scale resizes from that copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .images import resize
from .items import PreparedItem
from .schedule import Schedule, style_size


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
