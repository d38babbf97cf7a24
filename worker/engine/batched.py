"""Per-item optimisers for a group of independent jobs in one batch: Adam and L-BFGS on (B, ...) tensors.

Every item has its own step count, learning rate, finite mask and (L-BFGS) curvature history, so item
b of a group follows the same path as a run of b alone (to float rounding: batched convolutions and
reductions round differently). Nothing here reads a value back to the host: the branches of torch's
optimisers (``if ys > 1e-10``, ``if gtd > -tol``, a 0-dim tensor as ``alpha``) become ``torch.where``
on (B,) masks, so a step is a fixed sequence of kernels (issue 11: capturable, no host syncs).

Both export one item's state in the format of the torch optimiser a single run uses
(``torch.optim.Adam`` / ``torch.optim.LBFGS`` state_dicts), so a job checkpointed inside a group
resumes alone, as any other job does (optim.Stepper loads it), and load such a state into one item,
so a job checkpointed anywhere resumes inside a group too (group_resume.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which single runs use


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over one item's dimensions."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class BatchedAdam:
    """torch.optim.Adam's update (amsgrad off, no weight decay), per item."""

    def __init__(self, x: torch.Tensor, betas: tuple[float, float]) -> None:
        self.betas = betas
        self.m = torch.zeros_like(x)  # (B, C, H, W) first moment
        self.v = torch.zeros_like(x)  # (B, C, H, W) second moment
        self.steps = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)  # (B,) per item

    @torch.no_grad()
    def step(self, x: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, take: torch.Tensor) -> None:
        """Update x in place where ``take`` (B,) is set; the other items keep x and their moments
        (a non-finite evaluation never reaches the moments, as in a single run)."""
        b1, b2 = self.betas
        steps = self.steps + take.to(self.steps.dtype)
        # bias corrections in float64, as torch computes them on host floats
        bc1 = 1 - b1 ** steps.clamp_min(1)
        bc2 = (1 - b2 ** steps.clamp_min(1)).sqrt()
        t = _col(take, x)
        self.m = torch.where(t, torch.lerp(self.m, grad, 1 - b1), self.m)
        self.v = torch.where(t, torch.addcmul(self.v * b2, grad, grad, value=1 - b2), self.v)
        denom = self.v.sqrt() / _col(bc2.to(x.dtype), x) + ADAM_EPS
        size = _col((lr.to(torch.float64) / bc1).to(x.dtype), x)
        x.copy_(torch.where(t, x - size * (self.m / denom), x))  # addcdiv's order: value * (m / d)
        self.steps = steps

    def resized(self, hw: tuple[int, int]) -> None:
        """Moments carried to the next scale as optim.resize_adam_state does (m bicubic, v bilinear)."""
        self.m = F.interpolate(self.m, size=hw, mode="bicubic", align_corners=False)
        self.v = F.interpolate(self.v, size=hw, mode="bilinear", align_corners=False).relu_()

    def keep(self, index: torch.Tensor) -> None:
        """Only these items go on (a group compacted at a scale boundary)."""
        self.m, self.v, self.steps = self.m[index], self.v[index], self.steps[index]

    def item_state(self, b: int, lr: float) -> dict[str, Any]:
        """Item b as a torch.optim.Adam state_dict over one (1, C, H, W) parameter."""
        param = torch.zeros_like(self.m[b : b + 1], device="cpu")
        opt = torch.optim.Adam([param], lr=lr, betas=self.betas)
        opt.state[param] = {
            "step": torch.tensor(float(self.steps[b])),
            "exp_avg": self.m[b : b + 1].detach().float().cpu().clone(),
            "exp_avg_sq": self.v[b : b + 1].detach().float().cpu().clone(),
        }
        return opt.state_dict()

    def load_item(self, b: int, state: dict[str, Any]) -> None:
        """Item b from a torch.optim.Adam state_dict over one (1, C, H, W) parameter (empty: fresh)."""
        for held in state["state"].values():
            self.m[b : b + 1] = held["exp_avg"].to(self.m)
            self.v[b : b + 1] = held["exp_avg_sq"].to(self.v)
            self.steps[b] = float(held["step"])


class BatchedAverage:
    """optim.IterateAverage per item: a bias-corrected EMA of the iterate, updated where a step was taken."""

    def __init__(self, x: torch.Tensor, decay: float) -> None:
        self.decay = decay
        self.value = (1 - decay) * x.detach().clone()  # the first update from zero
        self.accum = torch.full((x.shape[0],), decay, dtype=torch.float64, device=x.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, took: torch.Tensor) -> None:
        t = _col(took, x)
        self.value = torch.where(t, self.value * self.decay + x * (1 - self.decay), self.value)
        self.accum = torch.where(took, self.accum * self.decay, self.accum)

    def get(self) -> torch.Tensor:
        return (self.value / _col((1 - self.accum).to(self.value.dtype), self.value)).clamp_(0, 1)

    def keep(self, index: torch.Tensor) -> None:
        self.value, self.accum = self.value[index], self.accum[index]

    def item_state(self, b: int) -> dict[str, Any]:
        return {"value": self.value[b : b + 1].detach().cpu().clone(), "accum": float(self.accum[b])}

    def load_item(self, b: int, state: dict[str, Any]) -> None:
        """Item b from an optim.IterateAverage state (a mid-scale checkpoint's ``average``)."""
        self.value[b : b + 1] = state["value"].to(self.value)
        self.accum[b] = float(state["accum"])


# the per-item L-BFGS has its own module (its direction is a small linear-algebra problem)
from .batched_lbfgs import BatchedLBFGS  # noqa: E402

__all__ = ["BatchedAdam", "BatchedAverage", "BatchedLBFGS"]
