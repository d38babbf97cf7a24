"""Colour helpers for luminance-only transfer (Gatys et al. 2016, "Preserving colour").

The image is split into luminance Y and chroma I, Q (YIQ, as the paper does); style transfer runs on Y
only and the result's Y is recombined with the content's I, Q.
"""

from __future__ import annotations

import torch

# NTSC YIQ, rows are Y, I, Q.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W) YIQ."""
    m = _RGB_TO_YIQ.to(x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", m, x)


def yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) YIQ -> (B, 3, H, W) RGB (not clamped)."""
    m = _YIQ_TO_RGB.to(x.device, x.dtype)
    return torch.einsum("ij,bjhw->bihw", m, x)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W) grey image whose three channels are the luminance Y."""
    y = rgb_to_yiq(x)[:, :1]
    return y.expand(-1, 3, -1, -1).contiguous()


def match_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Grey style luminance with the mean and std of the content's luminance (the paper's
    luminance matching, so the style's brightness range does not override the content's)."""
    ys, yc = luminance(style), luminance(content)
    out = (ys - ys.mean()) / (ys.std() + 1e-5) * yc.std() + yc.mean()
    return out.clamp(0, 1)


def recombine(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Y of ``result`` with the I, Q of ``content`` (same size), clamped to [0, 1]."""
    yiq = rgb_to_yiq(content)
    yiq[:, :1] = rgb_to_yiq(result)[:, :1]
    return yiq_to_rgb(yiq).clamp(0, 1)
