"""A job's inputs as tensors (PreparedItem), per colour mode, and the per-scale loss bookkeeping."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from . import color
from .images import resize

logger = logging.getLogger(__name__)


@dataclass
class PreparedItem:
    """One batch item as tensors: (1, 3, H, W) fp32 [0, 1] originals, blend and loss weights."""

    content: torch.Tensor  # what the content loss sees (grey luminance for color="luminance")
    original: torch.Tensor  # the content as given, for colour recombination
    styles: list[torch.Tensor]  # as the style loss sees them (colour-matched or grey per mode)
    blend: list[float]
    weights: tuple[float, float, float]  # content, style, tv
    style_hws: list[tuple[int, int]] = field(default_factory=list)  # native (h, w); [] = as given
    # one (1, 1, h, w) mask in [0, 1] per style (spatial control), at the content's aspect; None: none
    masks: list[torch.Tensor] | None = None
    # one key per style: equal keys are the same prepared style, whose statistics a batch computes
    # once per scale (a group's jobs often share a house style); [] = no sharing
    style_keys: list[str] = field(default_factory=list)

    def masks_at(self, hw: tuple[int, int]) -> list[torch.Tensor] | None:
        """The masks resized to a scale's (h, w) (bicubic, antialiased when shrinking, clamped)."""
        return None if self.masks is None else [resize(m, hw) for m in self.masks]


def removed_fractions(start: list[list[float]] | None, now: list[float]) -> dict[str, float | None]:
    """1 - now / start for the total and each term, summed over the batch; None where the start is
    not > 0 (or not known yet). ``start`` is per item (content, style, tv); ``now`` is the
    (total, content, style, tv) summed over the batch."""
    names = ("loss", "content", "style", "tv")
    if start is None:
        return dict.fromkeys(names)
    terms = [math.fsum(col) for col in zip(*start, strict=True)]
    begun = [math.fsum(terms), *terms]
    return {n: (1.0 - v / b if b > 0 else None) for n, b, v in zip(names, begun, now, strict=True)}


def prepare_item(
    content: torch.Tensor,
    styles: list[torch.Tensor],
    blend: list[float],
    weights: tuple[float, float, float],
    mode: str,
) -> PreparedItem:
    """Inputs for a colour mode (config.color). "luminance" (Gatys et al. 2017, sec. 3): content and
    styles become grey luminance images, each style's Y matched to the content's mean and std.
    "histogram" (ibid.): each style's colours get the content's mean and covariance."""
    if mode == "luminance":
        styles = [color.match_luminance(s, content) for s in styles]
        return PreparedItem(color.luminance(content), content, styles, blend, weights)
    if mode == "histogram":
        styles = [color.match_color(s, content) for s in styles]
    return PreparedItem(content, content, styles, blend, weights)
