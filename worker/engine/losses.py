"""Gram matrices and the three losses, per image of a batch; style targets computed once per scale.

All losses are computed in fp32 whatever the VGG pass ran in (features are cast with .float()).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .vgg import VGGFeatures

logger = logging.getLogger(__name__)


class _GramProduct(torch.autograd.Function):
    """F F^T for (B, C, N) F, with a one-product backward: d/dF = (dG + dG^T) F.

    Autograd's own bmm backward does two products (dG F and F^T dG); the Gram matrices are ~20 % of
    an iteration on CPU, so this saves about a third of that.
    """

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        if flat.shape[0] == 1:  # mm is faster than bmm for a single matrix on CPU
            return (flat[0] @ flat[0].T).unsqueeze(0)
        return torch.bmm(flat, flat.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (flat,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)  # (B, C, C), symmetric
        if flat.stride(1) == 1:
            # Channel-minor (channels_last) features: produce the gradient in that layout, as
            # (F^T sym)^T = sym F, so no copy is needed on the way back to the conv.
            return torch.matmul(flat.transpose(1, 2), sym).transpose(1, 2)
        if flat.shape[0] == 1:
            return (sym[0] @ flat[0]).unsqueeze(0)
        return torch.bmm(sym, flat)


def gram(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) features -> (B, C, C) fp32 Gram matrices normalised by C*H*W."""
    b, c, h, w = f.shape
    f = f.float()
    if f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous():
        # NHWC: (B, H*W, C) is a view; its transpose is the (B, C, N) matrix without a copy
        flat = f.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    else:
        flat = f.reshape(b, c, h * w)
    return _GramProduct.apply(flat) / (c * h * w)


def content_loss(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) vs (B, C, H, W) -> (B,) mean squared error per image."""
    return (f.float() - target).pow(2).mean(dim=(1, 2, 3))


def style_layer_loss(g: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, C) Gram vs (B, C, C) target -> (B,) mean squared error per image."""
    return (g - target).pow(2).mean(dim=(1, 2))


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) mean squared difference of horizontal plus vertical neighbours.

    A mean, not jcjohnson's sum, so the same weight means the same thing at every scale.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
    return dx + dy


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for the VGG pass only (None = plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Targets:
    """Targets for one scale, computed once: content features and blended style Grams per item."""

    content: dict[int, torch.Tensor]  # layer -> (B, C, h, w) fp32
    style: dict[int, torch.Tensor]  # layer -> (B, C, C) fp32, blend-weighted sum over styles
    weights: torch.Tensor  # (B, 3): content, style, tv weight per item


StyleImages = list[list[tuple[torch.Tensor, float]]]  # per item: [(1,3,h,w) style image, blend weight]


@torch.no_grad()
def compute_targets(
    model: VGGFeatures,
    contents: torch.Tensor,
    styles: StyleImages,
    content_layers: list[int],
    style_layers: list[int],
    weights: torch.Tensor,
    cast: Callable[[], contextlib.AbstractContextManager],
) -> Targets:
    """contents (B, 3, H, W); one VGG pass for the contents and one per style image."""
    with cast():
        feats = model(contents, frozenset(content_layers))
    content = {i: feats[i].float() for i in content_layers}
    per_item: list[dict[int, torch.Tensor]] = []
    for item_styles in styles:
        acc: dict[int, torch.Tensor] = {}
        for image, blend in item_styles:
            with cast():
                sf = model(image, frozenset(style_layers))
            for i in style_layers:
                g = gram(sf[i])[0] * blend  # (C, C)
                acc[i] = acc[i] + g if i in acc else g
        per_item.append(acc)
    style = {i: torch.stack([acc[i] for acc in per_item]) for i in style_layers}
    return Targets(content, style, weights)


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
        cast: Callable[[], contextlib.AbstractContextManager],
        channels_last: bool = False,
        start: torch.Tensor | None = None,
    ) -> None:
        self.model, self.targets, self.cast = model, targets, cast
        self.layer_weights = style_layer_weights
        self.wanted = frozenset(targets.content) | frozenset(targets.style)
        self.channels_last = channels_last
        self._norm: torch.Tensor | None = None
        self.start = start

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
        c = sum((content_loss(feats[i], t.content[i]) for i in t.content), zero)  # (B,)
        s = sum(
            (w * style_layer_loss(gram(feats[i]), t.style[i]) for i, w in self.layer_weights.items()),
            zero,
        )  # (B,)
        per_image = torch.stack([c, s, tv_loss(x)], dim=1) * t.weights  # (B, 3) weighted
        if self.start is None:
            self.start = per_image.detach().clone()
        assert self._norm is not None
        objective = (per_image.sum(dim=1) / self._norm).sum()  # images are independent terms
        terms = per_image.sum(dim=0)  # (3,) summed over the batch
        return torch.cat([objective.view(1), terms.sum().view(1), terms])
