"""W2 style loss: the Wasserstein-2 distance between Gaussian fits of one layer's VGG features.

A style layer's features F (B, C, H, W) are summarised per image by the Gaussian N(mu, S) of its H*W
feature vectors: mu (B, C) the channel means, S = srm - mu mu^T (B, C, C) the covariance, from
srm = F F^T / (H*W) the second raw moment (raw moments, not S, are what blend linearly across
styles). Between Gaussians W2 has a closed form (Dowson & Landau 1982; Olkin & Pukelsheim 1982):

    W2^2 = |mu - mu_t|^2 + tr(S + S_t - 2 (S_t^1/2 S S_t^1/2)^1/2)

As in crowsonkb/style-transfer-pytorch's StyleLossW2 (see also Mroueh, "Wasserstein Style Transfer",
arXiv:1905.12828), both terms are divided by C (means over channels, not sums); it replaces the Gram
MSE. It matches the covariance rather than the uncentred Gram, in feature units squared, so the
relative form w2_loss / target.energy is what is comparable across layers and styles.

Cost: one eigh of a (C, C) matrix per style layer per iteration (the target's square root is cached
per scale): O(C^3) whatever the image size. Measured on the 2-core dev CPU (AMD EPYC, torch 2.14,
fp32, B=1, C=512 as relu4_1/relu5_1, 64 dead channels): sqrtm forward (eigh) + backward 26 ms of one
core's CPU time (eigh alone 13 ms; best 2-thread wall time 16 ms); all of w2_loss forward + backward
38 ms. Not measured on a GPU, where eigh is slow for its FLOPs and may synchronise with the host.

Departures from crowsonkb (HEAD: 12 Newton-Schulz iterations, forward and Lyapunov backward):
- sqrtm is an exact eigh with a closed-form (Daleckii-Krein) backward: Newton-Schulz normalises by
  the Frobenius norm and converges slowly on the ill-conditioned, rank-deficient covariances of
  post-ReLU features (dead channels); eigh costs more on a GPU but is exact to rounding.
- negative eigenvalues (rounding) are clamped to 0 (crowsonkb's eigh variant takes abs()), and the
  backward's denominator sqrt(l_i) + sqrt(l_j) is floored, so rank-deficient inputs give finite grads.
- per-image losses (B,) instead of one mean over the batch; tiny negative results are clamped to 0
  with the gradient passed straight through; and `energy` (below) for a relative loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# Added to the covariance diagonal (as crowsonkb, whose default is also 1e-4). It makes S strictly
# positive definite, so a dead channel (all zeros after ReLU) is a narrow Gaussian rather than a
# degenerate one (sqrt eigenvalues >= 1e-2), and it is meant to be small against the variance of a
# live channel (not measured here: no pretrained weights on this machine), so it barely moves the
# loss: in 1-D the covariance term is (sqrt(s1^2 + eps) - sqrt(s2^2 + eps))^2. Both sides get it, so
# identical statistics still give 0. It is absolute: for large-scale features (Caffe VGG, 0-255
# inputs) it can fall below the fp32 rounding of srm - mu mu^T; then the relative floor in sqrtm's
# backward is what keeps gradients finite.
EPS = 1e-4
# energy is floored here so that 1 / energy stays finite for an all-zero target (eps=0 included).
ENERGY_FLOOR = 1e-8


def _fp(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return t if t.dtype == torch.float64 else t.float()


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    """Autocast would run the matmuls below in fp16/bf16 (and eigh refuses half precision)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class _Sqrtm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        a = (a + a.mT) / 2  # (B, C, C); eigh reads one triangle only, so symmetrise explicitly
        vals, vecs = torch.linalg.eigh(a)  # (B, C), (B, C, C); a = V diag(l) V^T
        s = vals.clamp_min(0).sqrt()  # (B, C); PSD in, so l < 0 is rounding
        ctx.save_for_backward(vals, vecs, s)
        root: torch.Tensor = (vecs * s.unsqueeze(-2)) @ vecs.mT  # V diag(s) V^T, symmetric PSD
        return root

    @staticmethod
    @once_differentiable  # the backward below is not itself differentiable by autograd
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        vals, vecs, s = ctx.saved_tensors
        with _no_autocast(grad):
            grad = grad.to(vecs.dtype)
            grad = (grad + grad.mT) / 2  # (B, C, C); the input was symmetrised, so is its gradient
            denom = s.unsqueeze(-1) + s.unsqueeze(-2)  # (B, C, C): sqrt(l_i) + sqrt(l_j)
            # Two null (or rounding-level) eigenvalues give 0 / 0 here; sqrt'(0) is infinite, so
            # floor at 2 sqrt(eps_machine * l_max), where eigh can no longer tell l from 0.
            lmax = vals.abs().amax(dim=-1)[..., None, None]  # (B, 1, 1)
            floor = (4 * torch.finfo(vals.dtype).eps * lmax).sqrt()
            denom = torch.maximum(denom, floor.clamp_min(torch.finfo(vals.dtype).eps))
            inner = (vecs.mT @ grad @ vecs) / denom  # (B, C, C): V^T dS V / (s_i + s_j)
            d_a: torch.Tensor = vecs @ inner @ vecs.mT  # Daleckii-Krein: dA = V [...] V^T
            return d_a


def sqrtm(a: torch.Tensor) -> torch.Tensor:
    """(..., C, C) symmetric PSD -> its symmetric PSD square root, in fp32 (fp64 if given fp64).

    Differentiable with a closed-form backward. Not autograd through eigh: its backward divides by
    l_i - l_j, infinite for repeated eigenvalues, which rank-deficient covariances always have.
    """
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"sqrtm wants (..., C, C) square matrices, got {tuple(a.shape)}")
    with _no_autocast(a):
        out: torch.Tensor = _Sqrtm.apply(_fp(a))
        return out


@dataclass
class W2Target:
    """One style layer's target Gaussian, computed once per scale (no grad)."""

    mean: torch.Tensor  # (B, C)
    cov: torch.Tensor  # (B, C, C) srm - mean mean^T + eps I
    cov_sqrt: torch.Tensor  # (B, C, C) symmetric PSD square root of cov
    energy: torch.Tensor  # (B,) mean(mean**2) + mean(diag(cov)): W2^2 to a point mass at 0


def _cov(mean: torch.Tensor, srm: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C), (B, C, C) -> (B, C, C) covariance + eps I, symmetrised (srm need not be exactly)."""
    cov = srm - mean.unsqueeze(-1) * mean.unsqueeze(-2)  # E[f f^T] - mu mu^T
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return (cov + cov.mT) / 2 + eps * eye


@torch.no_grad()
def moments_to_target(mean: torch.Tensor, srm: torch.Tensor, eps: float = EPS) -> W2Target:
    """Target from blended raw moments: mean (B, C), srm (B, C, C) (blend weights summing to 1)."""
    with _no_autocast(mean):
        mean, srm = _fp(mean).detach().clone(), _fp(srm).detach()  # own copy: callers blend in place
        cov = _cov(mean, srm, eps)
        energy = mean.pow(2).mean(-1) + cov.diagonal(dim1=-2, dim2=-1).mean(-1)  # (B,)
        return W2Target(mean, cov, sqrtm(cov), energy.clamp_min(ENERGY_FLOOR))


def w2_loss(mean: torch.Tensor, srm: torch.Tensor, target: W2Target, eps: float = EPS) -> torch.Tensor:
    """(B, C) mean, (B, C, C) srm of the image's features vs target -> (B,) squared W2 over C.

    Not normalised: divide by target.energy for a relative loss. Use the eps of moments_to_target.
    """
    with _no_autocast(mean):
        mean, srm = _fp(mean), _fp(srm)
        cov = _cov(mean, srm, eps)  # (B, C, C)
        mean_term = (mean - target.mean).pow(2).mean(-1)  # (B,)
        root = sqrtm(target.cov_sqrt @ cov @ target.cov_sqrt)  # (B, C, C): (S_t^1/2 S S_t^1/2)^1/2
        cov_term = (target.cov + cov - 2 * root).diagonal(dim1=-2, dim2=-1).mean(-1)  # (B,)
        # The trace is a difference of large terms and can round below 0. Clamp the value only:
        # clamp_min would zero the gradient there, stalling the optimiser short of its minimum.
        cov_term = cov_term + (cov_term.clamp_min(0) - cov_term).detach()
        return mean_term + cov_term
