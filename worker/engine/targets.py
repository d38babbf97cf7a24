"""What a scale's losses must match, computed once per scale: content features, style statistics per
region, and the divisors that make every term relative (config.loss_terms).

A *region* is where one style target applies. Without masks each item has one region, everywhere,
whose target is the blend of its styles' statistics (jcjohnson, crowsonkb: the weighted sum of the
Grams). With masks (Gatys et al. 2017, "Controlling perceptual factors", spatial control) each style
is a region of its own: its statistics are matched by the output's statistics weighted by its mask.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import w2
from .losses import moments, tv_loss
from .vgg import VGGFeatures

logger = logging.getLogger(__name__)

# Divisors of the relative terms are at least these, so a term whose target has no energy (an all-zero
# feature map, a perfectly flat content) stays finite; it is then effectively the raw term, scaled up.
MIN_ENERGY = 1e-30
# tv(content) floor: neighbour differences of ~1 % RMS; a flat content would otherwise make any
# texture infinitely "rough"
MIN_TV = 1e-4

StyleImages = list[list[tuple[torch.Tensor, float]]]  # per item: [(1, 3, h, w) style image, blend]
Moments = tuple[torch.Tensor, torch.Tensor]  # (C,) mean, (C, C) second raw moment F F^T / N
RegionRow = tuple[torch.Tensor | None, float, dict[int, Moments]]  # one item's (mask, weight, moments)


@dataclass
class Region:
    """One style region of every item of the batch at one scale."""

    mask: torch.Tensor | None  # (B, 1, H, W) in [0, 1] at the image's size; None = everywhere
    weight: torch.Tensor  # (B,) this region's share of the style term (0: an item with fewer regions)
    # layer -> the target: a (B, C, C) Gram (style_loss "gram") or a w2.W2Target ("w2")
    style: dict[int, Any]
    norm: dict[int, torch.Tensor]  # layer -> (B,) divisor: the target's energy (relative) or 1 (raw)


@dataclass
class Targets:
    """Targets for one scale. ``weights`` (B, 3): content, style, tv weight per item."""

    content: dict[int, torch.Tensor]  # layer -> (B, C, h, w) fp32
    regions: list[Region]
    weights: torch.Tensor
    content_norm: dict[int, torch.Tensor] | None = None  # layer -> (B,); None = 1 (raw)
    tv_norm: torch.Tensor | None = None  # (B,) tv of the content; None = 1 (raw)
    style_loss: str = "gram"


@dataclass
class StyleSpec:
    """How the style term is formed: ``gram`` or ``w2`` (config.style_loss), and relative or raw."""

    kind: str = "gram"
    relative: bool = True


@torch.no_grad()
def compute_targets(
    model: VGGFeatures,
    contents: torch.Tensor,
    styles: StyleImages,
    content_layers: list[int],
    style_layers: list[int],
    weights: torch.Tensor,
    cast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    masks: list[list[torch.Tensor] | None] | None = None,
    spec: StyleSpec | None = None,
    style_keys: list[list[str]] | None = None,
) -> Targets:
    """contents (B, 3, H, W); one VGG pass for the contents and one per distinct style image.
    ``masks`` per item: None, or one (1, 1, H, W) mask per style at the contents' size.
    ``style_keys`` per item, one per style: styles with equal keys (and size) are one VGG pass."""
    spec = spec or StyleSpec()
    with cast():
        feats = model(contents, frozenset(content_layers))
    content = {i: feats[i].float() for i in content_layers}
    per_item: list[list[RegionRow]] = []  # per item, its regions
    seen: dict[tuple[str, tuple[int, ...]], dict[int, Moments]] = {}
    for b, item_styles in enumerate(styles):
        item_masks = masks[b] if masks is not None else None
        keys = style_keys[b] if style_keys is not None and style_keys[b] else [None] * len(item_styles)
        stats = []
        for (image, _), key in zip(item_styles, keys, strict=True):
            if key is None:
                stats.append(_style_moments(model, image, style_layers, cast))
                continue
            cached = seen.get((key, tuple(image.shape)))
            if cached is None:
                cached = seen[(key, tuple(image.shape))] = _style_moments(model, image, style_layers, cast)
            stats.append(cached)
        blends = [blend for _, blend in item_styles]
        if item_masks is None:  # one region: the blend of all styles (moments combine linearly)
            blended = {i: _blend([s[i] for s in stats], blends) for i in style_layers}
            per_item.append([(None, 1.0, blended)])
        else:
            per_item.append([(m, bl, s) for m, bl, s in zip(item_masks, blends, stats, strict=True)])
    regions = _regions(per_item, contents, style_layers, spec)
    content_norm = tv_norm = None
    if spec.relative:
        content_norm = {i: f.pow(2).mean(dim=(1, 2, 3)).clamp_min(MIN_ENERGY) for i, f in content.items()}
        tv_norm = tv_loss(contents).clamp_min(MIN_TV)
    return Targets(content, regions, weights, content_norm, tv_norm, spec.kind)


def _style_moments(
    model: VGGFeatures,
    image: torch.Tensor,
    layers: list[int],
    cast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> dict[int, Moments]:
    with cast():
        sf = model(image, frozenset(layers))
    out = {}
    for i in layers:
        mean, srm = moments(sf[i])
        out[i] = (mean[0], srm[0])
    return out


def _blend(stats: list[Moments], blends: list[float]) -> Moments:
    mean = sum((s[0] * w for s, w in zip(stats, blends, strict=True)), torch.zeros_like(stats[0][0]))
    srm = sum((s[1] * w for s, w in zip(stats, blends, strict=True)), torch.zeros_like(stats[0][1]))
    return mean, srm


def _regions(
    per_item: list[list[RegionRow]], contents: torch.Tensor, layers: list[int], spec: StyleSpec
) -> list[Region]:
    """Stack the items' regions into batched Regions; an item with fewer regions than the most gets
    padding regions of weight 0 (target zero, divisor 1, mask everywhere: finite, and multiplied by 0)."""
    count = max(len(r) for r in per_item)
    h, w = contents.shape[-2:]
    masked = any(m is not None for r in per_item for m, _, _ in r)
    regions = []
    for k in range(count):
        rows = [r[k] if k < len(r) else None for r in per_item]
        weight = torch.tensor([row[1] if row else 0.0 for row in rows], device=contents.device)
        mask = None
        if masked:
            ones = contents.new_ones(1, 1, h, w)
            mask = torch.cat([row[0] if row and row[0] is not None else ones for row in rows])
        style, norm = {}, {}
        for i in layers:
            mean, srm = (
                torch.stack(t) for t in zip(*[_or_zero(row, per_item, i) for row in rows], strict=True)
            )
            style[i], energy = _target(mean, srm, spec.kind)
            keep = torch.tensor(
                [row is not None and spec.relative for row in rows], device=contents.device
            )  # padding and raw terms: divisor 1
            norm[i] = torch.where(keep, energy.clamp_min(MIN_ENERGY), torch.ones_like(energy))
        regions.append(Region(mask, weight, style, norm))
    return regions


def _or_zero(row: Any, per_item: list[Any], layer: int) -> Moments:
    if row is not None:
        found: Moments = row[2][layer]
        return found
    mean, srm = per_item[0][0][2][layer]
    return torch.zeros_like(mean), torch.zeros_like(srm)


def _target(mean: torch.Tensor, srm: torch.Tensor, kind: str) -> tuple[Any, torch.Tensor]:
    """(B, C) mean, (B, C, C) srm -> the loss's target and its (B,) energy."""
    if kind == "w2":
        t = w2.moments_to_target(mean, srm)
        return t, t.energy
    g = srm / srm.shape[-1]  # our Gram is F F^T / (C H W) = srm / C
    return g, g.pow(2).mean(dim=(1, 2))
