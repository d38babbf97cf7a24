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
CURVATURE_MIN = 1e-10  # torch.optim.LBFGS keeps a pair only when y.s exceeds this


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over one item's dimensions."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N) . (B, N) -> (B,)."""
    return (a * b).sum(dim=1)


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


class BatchedLBFGS:
    """torch.optim.LBFGS with max_iter=1, no line search and zero tolerances (optim.Stepper's), per
    item: one gradient in, one step out, the curvature history in ring buffers of ``history`` pairs.

    Item b's ring: the newest pair at ``(head[b] - 1) % history``; an empty slot has rho 0, so it adds
    nothing to either loop of the recursion. Items accept pairs at different iterations, so their
    rings are read through per-item indices (a gather of (B, N) per history entry)."""

    def __init__(self, x: torch.Tensor, history: int) -> None:
        b, n = x.shape[0], x[0].numel()
        self.h = history
        dev, dt = x.device, x.dtype
        self.S = torch.zeros(history, b, n, device=dev, dtype=dt)  # steps s = d * t
        self.Y = torch.zeros(history, b, n, device=dev, dtype=dt)  # gradient changes y
        self.rho = torch.zeros(history, b, device=dev, dtype=dt)  # 1 / y.s; 0: empty
        self.head = torch.zeros(b, dtype=torch.long, device=dev)  # the next slot to write
        self.count = torch.zeros(b, dtype=torch.long, device=dev)  # pairs held
        self.n_iter = torch.zeros(b, dtype=torch.long, device=dev)  # iterations since a reset
        self.d = torch.zeros(b, n, device=dev, dtype=dt)  # the last direction
        self.t = torch.zeros(b, device=dev, dtype=dt)  # its step length
        self.H_diag = torch.ones(b, device=dev, dtype=dt)
        self.prev_g = torch.zeros(b, n, device=dev, dtype=dt)
        self.rows = torch.arange(b, device=dev)
        self.iters = 0  # host: steps since the group's scale began (bounds the pairs held)

    @torch.no_grad()
    def step(self, x: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, take: torch.Tensor) -> None:
        """One iteration of each item where ``take``: the pair from the last step enters its history
        (when y.s > CURVATURE_MIN), the two-loop recursion gives the direction, x moves by t * d
        unless d is not a descent direction (torch stops before moving then, keeping its state)."""
        g = grad.reshape(grad.shape[0], -1)  # (B, N)
        first = self.n_iter == 0
        y, s = g - self.prev_g, self.d * self.t[:, None]
        ys = _dot(y, s)
        accept = take & ~first & (ys > CURVATURE_MIN)
        self._remember(accept, s, y, ys)
        self.iters += 1
        d = torch.where(first[:, None], -g, self._direction(g, min(self.iters, self.h)))
        t = torch.where(first, torch.clamp(1.0 / g.abs().sum(dim=1), max=1.0) * lr, lr.to(g.dtype))
        move = take & (_dot(g, d) <= 0)
        flat = x.view(x.shape[0], -1)
        flat.add_(torch.where(move[:, None], d * t[:, None], torch.zeros_like(d)))
        keep = take[:, None]
        self.d = torch.where(keep, d, self.d)
        self.t = torch.where(take, t, self.t)
        self.prev_g = torch.where(keep, g, self.prev_g)
        self.n_iter = self.n_iter + take.long()

    def _remember(self, accept: torch.Tensor, s: torch.Tensor, y: torch.Tensor, ys: torch.Tensor) -> None:
        slot, rows, a = self.head, self.rows, accept[:, None]
        self.S[slot, rows] = torch.where(a, s, self.S[slot, rows])
        self.Y[slot, rows] = torch.where(a, y, self.Y[slot, rows])
        self.rho[slot, rows] = torch.where(accept, 1.0 / torch.where(accept, ys, 1.0), self.rho[slot, rows])
        yy = _dot(y, y)
        self.H_diag = torch.where(accept, ys / torch.where(accept, yy, 1.0), self.H_diag)
        self.head = torch.where(accept, (self.head + 1) % self.h, self.head)
        self.count = torch.where(accept, torch.clamp(self.count + 1, max=self.h), self.count)

    def _direction(self, g: torch.Tensor, held: int) -> torch.Tensor:
        """The two-loop recursion, batched over items; ``held``: a host bound on the pairs held."""
        q = -g
        alphas = []
        for k in range(held):  # newest to oldest
            slot = (self.head - 1 - k) % self.h
            rho = self.rho[slot, self.rows]
            a = _dot(self.S[slot, self.rows], q) * rho
            q = q - a[:, None] * self.Y[slot, self.rows]
            alphas.append(a)
        r = q * self.H_diag[:, None]
        for k in reversed(range(held)):  # oldest to newest
            slot = (self.head - 1 - k) % self.h
            be = _dot(self.Y[slot, self.rows], r) * self.rho[slot, self.rows]
            r = r + (alphas[k] - be)[:, None] * self.S[slot, self.rows]
        return r

    def scale_last_step(self, shrink: torch.Tensor) -> None:
        """A capped step (optim.Stepper._cap_step): the next pair is the step actually taken."""
        self.t = self.t * shrink

    def reset(self, items: torch.Tensor) -> None:
        """Forget the history of these items (a NaN recovery: a fresh L-BFGS, as a single run's).
        Their pairs stay in S and Y (finite: only finite steps are kept) but with rho 0 they add
        nothing, and new pairs overwrite them; not copying S and Y keeps this cheap at every step."""
        self.rho = torch.where(items[None, :], 0.0, self.rho)
        for name in ("head", "count", "n_iter"):
            setattr(self, name, torch.where(items, 0, getattr(self, name)))
        self.H_diag = torch.where(items, 1.0, self.H_diag)

    def item_state(self, b: int, lr: float, loss: float) -> dict[str, Any]:
        """Item b as a torch.optim.LBFGS state_dict (history oldest first), as optim.Stepper makes."""
        param = torch.zeros(self.d.shape[1])
        # the hyperparameters optim.Stepper runs with: load_state_dict takes them from the dict
        opt = torch.optim.LBFGS(
            [param], lr=lr, max_iter=1, history_size=self.h, tolerance_grad=0.0, tolerance_change=0.0
        )
        count, head = int(self.count[b]), int(self.head[b])
        slots = [(head - count + k) % self.h for k in range(count)]
        n_iter = int(self.n_iter[b])
        opt.state[param] = {
            "func_evals": n_iter,
            "n_iter": n_iter,
            "d": self.d[b].detach().cpu().clone(),
            "t": self.t[b].detach().cpu().clone(),
            "old_dirs": [self.Y[i, b].detach().cpu().clone() for i in slots],
            "old_stps": [self.S[i, b].detach().cpu().clone() for i in slots],
            "ro": [self.rho[i, b].detach().cpu().clone() for i in slots],
            "H_diag": self.H_diag[b].detach().cpu().clone(),
            "prev_flat_grad": self.prev_g[b].detach().cpu().clone(),
            "prev_loss": loss,
        }
        return opt.state_dict()

    def load_item(self, b: int, state: dict[str, Any]) -> None:
        """Item b from a torch.optim.LBFGS state_dict (optim.Stepper's; empty: a fresh history):
        its pairs oldest first into slots 0.., the newest last, as item_state reads them."""
        for held in state["state"].values():
            if "d" not in held:  # it returned before its first step (an all-zero gradient)
                continue
            pairs = list(zip(held["old_stps"], held["old_dirs"], held["ro"], strict=True))[-self.h :]
            for k, (s, y, rho) in enumerate(pairs):
                self.S[k, b], self.Y[k, b] = s.to(self.S), y.to(self.Y)
                self.rho[k, b] = torch.as_tensor(rho).to(self.rho)
            self.head[b], self.count[b] = len(pairs) % self.h, len(pairs)
            self.n_iter[b] = int(held["n_iter"])
            self.d[b] = held["d"].to(self.d)
            self.t[b] = torch.as_tensor(held["t"]).to(self.t)
            self.H_diag[b] = torch.as_tensor(held["H_diag"]).to(self.H_diag)
            self.prev_g[b] = held["prev_flat_grad"].to(self.prev_g)
            self.iters = max(self.iters, len(pairs))  # the recursion's bound covers these pairs


__all__ = ["BatchedAdam", "BatchedAverage", "BatchedLBFGS"]
