"""The objective of one scale: the weighted content, style and TV terms of a batch, normalised.

Relative terms (config.loss_terms, targets.py) divide each term by its target's energy; the objective
divides the weighted total by its value at the scale's first evaluation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import w2
from .losses import content_loss, gram, masked_gram, moments, style_layer_loss, tv_loss
from .targets import Region, Targets
from .vgg import VGGFeatures

logger = logging.getLogger(__name__)


# Below this a weighted total counts as zero: its objective is not normalised (there is nothing to
# remove, and 1/total would overflow fp32).
MIN_START = 1e-30


class LossFn:
    """x (B, C, H, W) -> (5,) tensor: the objective, then total, content, style, tv (weighted, summed
    over the batch). C is 3 (RGB), or 1 for a luminance image (fed to the VGG as grey RGB).

    The objective is what is minimised: each item's weighted total divided by that total at the
    scale's first evaluation (``start``, detached), summed over the batch, so it is 1 per item at
    every scale's start whatever the weights' common scale. Departure from the papers (which
    minimise the raw weighted sum): torch's L-BFGS has absolute thresholds (curvature pairs with
    y.s <= 1e-10 are dropped) that a small objective never passes, so it stalls. Dividing by a
    positive constant per scale does not move the minimiser: the weights keep their meaning as the
    balance between the raw terms; only their common factor is divided out.
    """

    def __init__(
        self,
        model: VGGFeatures,
        targets: Targets,
        style_layer_weights: dict[int, float],
        cast: Callable[[], contextlib.AbstractContextManager[Any]],
        channels_last: bool = False,
        start: torch.Tensor | None = None,
    ) -> None:
        self.model, self.targets, self.cast = model, targets, cast
        self.layer_weights = style_layer_weights
        self.wanted = frozenset(targets.content) | frozenset(style_layer_weights)
        self.channels_last = channels_last
        self._norm: torch.Tensor | None = None
        self.start = start
        # A group (group.py): items whose start is still to be taken (their first evaluation was not
        # finite) take it from the next call, per item, as a single run does by resetting ``start``
        self.retake: torch.Tensor | None = None  # (B,) bool
        self.per_image: torch.Tensor | None = None  # (B, 3) weighted terms of the last call, detached
        # (region, layer) -> the region's mask at that layer's resolution, and its sum (B,)
        self._masks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def start(self) -> torch.Tensor | None:
        """(B, 3) weighted terms at the scale's first evaluation; None: taken at the next call."""
        return self._start

    @start.setter
    def start(self, value: torch.Tensor | None) -> None:
        self._start, self._norm = value, None
        if value is not None:
            total = value.sum(dim=1)  # (B,)
            self._norm = torch.where(total > MIN_START, total, torch.ones_like(total))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # luminance: grey to the VGG
        inp = rgb.contiguous(memory_format=torch.channels_last) if self.channels_last else rgb
        with self.cast():
            feats = self.model(inp, self.wanted)
        t = self.targets
        zero = x.new_zeros(x.shape[0])
        c = sum((self._content(feats[i], i) for i in t.content), zero)  # (B,)
        s = sum((self._style(feats, k, region) for k, region in enumerate(t.regions)), zero)  # (B,)
        tv = tv_loss(x) if t.tv_norm is None else tv_loss(x) / t.tv_norm
        per_image = torch.stack([c, s, tv], dim=1) * t.weights  # (B, 3) weighted
        if self.start is None:
            self.start = per_image.detach().clone()
        elif self.retake is not None:
            self.start = torch.where(self.retake[:, None], per_image.detach(), self.start)
        self.per_image = per_image.detach()
        assert self._norm is not None
        objective = (per_image.sum(dim=1) / self._norm).sum()  # images are independent terms
        terms = per_image.sum(dim=0)  # (3,) summed over the batch
        return torch.cat([objective.view(1), terms.sum().view(1), terms])

    def _content(self, f: torch.Tensor, layer: int) -> torch.Tensor:
        loss = content_loss(f, self.targets.content[layer])  # (B,)
        norm = self.targets.content_norm
        return loss if norm is None else loss / norm[layer]

    def _style(self, feats: dict[int, torch.Tensor], k: int, region: Region) -> torch.Tensor:
        """(B,) this region's style term: sum over layers of weight * loss / divisor, times the
        region's weight. Unmasked Gram layers take the plain (fastest) Gram."""
        w2_kind = self.targets.style_loss == "w2"
        total = None
        for i, w in self.layer_weights.items():
            f = feats[i]
            mask, count = self._mask(k, i, f, region) if region.mask is not None else (None, None)
            if w2_kind:
                mean, srm = moments(f, mask)
                loss = w2.w2_loss(mean, srm, region.style[i])
            else:
                g = gram(f) if mask is None else masked_gram(f, mask, count)
                loss = style_layer_loss(g, region.style[i])
            term = w * loss / region.norm[i]
            total = term if total is None else total + term
        assert total is not None
        return total * region.weight

    def _mask(self, k: int, layer: int, f: torch.Tensor, region: Region) -> tuple[torch.Tensor, torch.Tensor]:
        """The region's (B, 1, h, w) mask at this layer's resolution, area-averaged (the fraction
        of each feature's receptive cell inside the region; Gatys et al. 2017 propagate masks
        through the network's pooling instead), cached for the scale."""
        key = (k, layer)
        if key not in self._masks:
            assert region.mask is not None
            m = F.interpolate(region.mask, size=f.shape[-2:], mode="area").clamp_(0, 1)
            self._masks[key] = (m, m.sum(dim=(1, 2, 3)).clamp_min(1e-6))
        return self._masks[key]
