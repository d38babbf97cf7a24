"""Gram matrices, feature moments and the three losses, per image of a batch (pure functions).

All losses are computed in fp32 whatever the VGG pass ran in (features are cast with .float()).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

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
            one: torch.Tensor = sym[0] @ flat[0]
            return one.unsqueeze(0)
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
    product: torch.Tensor = _GramProduct.apply(flat)
    return product / (c * h * w)


def moments(f: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) features -> (B, C) mean and (B, C, C) second raw moment F F^T / N, fp32; with a
    (B, 1, H, W) mask in [0, 1], both weighted by it (N = the mask's sum). Raw moments, unlike
    covariances, blend linearly across styles (crowsonkb)."""
    c = f.shape[1]
    if mask is None:
        return f.float().mean(dim=(2, 3)), gram(f) * c
    count = mask.sum(dim=(1, 2, 3)).clamp_min(1e-6)  # (B,); an empty region: zero moments
    mean = (f.float() * mask).sum(dim=(2, 3)) / count[:, None]
    return mean, masked_gram(f, mask, count) * c


def masked_gram(f: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Gram of the features weighted by a (B, 1, H, W) mask: sum_p m_p f_p f_p^T / (C * sum_p m_p).
    The features are multiplied by sqrt(m), so each position is weighted by m once (Gatys et al. 2017
    multiply by the mask on both sides, m^2, which is the same for binary masks)."""
    h, w = f.shape[-2:]
    if count is None:
        count = mask.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    return gram(f.float() * mask.sqrt()) * (h * w / count)[:, None, None]


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for the VGG pass only (None = plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fast_cuda_math() -> None:
    """On CUDA, process-wide: TF32 for fp32 matmuls and convolutions, and cuDNN autotuning.

    The Grams are fp32 matmuls of features that are bf16 under autocast: every bf16 value is exact in
    TF32 (7 <= 10 mantissa bits) and the accumulation stays fp32, so TF32 loses nothing there and
    runs them on the tensor cores (engine review G2). The shapes repeat per scale and per group, so
    cuDNN's benchmark pays for itself after the first iteration (G3). Both make a GPU run depend on
    the algorithms picked: a resume on CUDA is close to, not bit-identical with, an uninterrupted run.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
