"""Colour control (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer",
sec. 3; first as arXiv:1606.05897, 2016): luminance-only transfer and colour histogram matching.

Luminance-only: the images are split into luminance Y and chroma I, Q (YIQ, as the paper does);
style transfer runs on Y only (the optimised image is Y itself) and the result's Y is recombined
with the content's I, Q. Histogram matching: each style's colours are mapped linearly so that their
mean and covariance are the content's, before the transfer (the paper's first method;
jcjohnson's -original_colors is a post-process on the result instead).
"""

from __future__ import annotations

import torch

# NTSC YIQ, rows are Y, I, Q.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
# Added to both colour covariances: a flat (single-colour) image has a singular one.
COV_EPS = 1e-5


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
    """The Y of ``result`` ((B, 1, H, W) luminance, or (B, 3, H, W) RGB) with the I, Q of
    ``content`` ((B, 3, H, W), same size), as RGB clamped to [0, 1]."""
    yiq = rgb_to_yiq(content)
    yiq[:, :1] = result if result.shape[1] == 1 else rgb_to_yiq(result)[:, :1]
    return yiq_to_rgb(yiq).clamp(0, 1)


def _sqrtm(cov: torch.Tensor, power: float) -> torch.Tensor:
    """cov ** power for a symmetric positive definite (3, 3) matrix, by eigendecomposition."""
    vals, vecs = torch.linalg.eigh(cov)
    out: torch.Tensor = vecs @ torch.diag(vals.clamp_min(COV_EPS) ** power) @ vecs.T
    return out


def match_color(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) style whose RGB mean and covariance are the content's ((1, 3, H, W)).

    x' = A (x - mu_s) + mu_c with A = Sigma_c^(1/2) Sigma_s^(-1/2), so A Sigma_s A^T = Sigma_c: the
    paper's colour histogram matching with the Image Analogies form of A (the paper also gives a
    Cholesky form; both match the first two moments). Computed in fp64 (3x3), clamped to [0, 1],
    which moves the statistics a little where the map leaves the range.
    """
    s = style[0].double().flatten(1)  # (3, N)
    c = content[0].double().flatten(1)  # (3, M)
    mu_s, mu_c = s.mean(dim=1, keepdim=True), c.mean(dim=1, keepdim=True)
    eye = torch.eye(3, dtype=torch.float64) * COV_EPS
    cov_s = torch.cov(s) + eye  # (3, 3)
    cov_c = torch.cov(c) + eye
    a = _sqrtm(cov_c, 0.5) @ _sqrtm(cov_s, -0.5)
    out = a @ (s - mu_s) + mu_c
    return out.view_as(style).to(style.dtype).clamp(0, 1)
