"""Optimiser steps in pixel space [0, 1] with a NaN guard; Adam state carried across scales.

L-BFGS: torch.optim.LBFGS with max_iter=1, so one step() is one closure evaluation is one reported
iteration; its history is reset at every scale. Note that for a batch L-BFGS couples the images (one
line-search step length and one curvature history for the whole batch), while Adam is per element,
so a batched Adam run is exactly a set of independent runs.
Departure from the papers: the image is clamped to [0, 1] after every step (as crowsonkb does), which
L-BFGS's curvature pairs do not know about; in practice it only bites at the borders of the range.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .errors import EngineError
from .scaler import LossScaler

logger = logging.getLogger(__name__)

LBFGS_STATE_LIMIT_BYTES = 64 * 2**20  # larger L-BFGS states are not put in checkpoints


class Stepper:
    """Owns the optimiser of one scale. step() -> the loss function's values as floats (the first is
    what is minimised; LossFn: objective, total, content, style, tv), the last finite ones."""

    def __init__(
        self,
        x: torch.Tensor,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        kind: str,
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.99),
        history: int = 50,
        state: dict[str, Any] | None = None,
        max_recoveries: int = 5,
        streak: int = 0,
        max_step: float = math.inf,
        scaler: LossScaler | None = None,
        ema_decay: float = 0.0,
        average: dict[str, Any] | None = None,
    ) -> None:
        self.x = x.detach().clone().requires_grad_(True)  # (B, C, H, W) the optimised image
        self.good = self.x.detach().clone()  # last iterate whose loss and gradient were finite
        self.loss_fn, self.kind, self.lr = loss_fn, kind, lr
        self.betas, self.history, self.max_step = betas, history, max_step
        self.scaler = scaler  # fp16: dynamic loss scaling (scaler.py); None: fp32/bf16, no scaling
        self.recoveries = 0
        # consecutive non-finite steps (carried across scales by the job); > max_recoveries: diverged
        self.max_recoveries, self.streak = max_recoveries, streak
        self.last: list[float] = []
        self.opt = self._new_optimizer()
        if state is not None:  # a copy: torch keeps the tensors it is given, and steps them in place
            self.opt.load_state_dict(_clone(state))
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        # Adam: the scale's result is an average of its iterates (crowsonkb); None: the iterate
        self.average: IterateAverage | None = None
        if kind == "adam" and ema_decay > 0:
            self.average = IterateAverage(self.x.detach(), ema_decay, average)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.kind == "adam":
            return torch.optim.Adam([self.x], lr=self.lr, betas=self.betas)
        # tolerance_grad=0 would stop on an exactly-zero gradient only: that is how a bad closure
        # makes step() return without moving (see _closure).
        return torch.optim.LBFGS(
            [self.x],
            lr=self.lr,
            max_iter=1,
            history_size=self.history,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

    def _evaluate(self) -> tuple[torch.Tensor, bool]:
        """Loss and gradient at x; one host sync for all loss terms and the finiteness check (one
        more per fp16 overflow, which evaluates x again at half the loss scale)."""
        while True:
            self.x.grad = None
            terms = self.loss_fn(self.x)
            scale = self.scaler.scale if self.scaler is not None else 1.0
            objective: torch.Tensor = terms[0] * scale if self.scaler is not None else terms[0]
            torch.autograd.backward(objective)
            assert self.x.grad is not None
            vals = torch.cat([terms.detach(), self.x.grad.sum().view(1)]).tolist()
            finite = [math.isfinite(v) for v in vals]
            if self.scaler is None or not self.scaler.retry(all(finite[:-1]), finite[-1]):
                break
        if self.scaler is not None:
            self.x.grad.mul_(1.0 / scale)  # exact: the scale is a power of two
        ok = all(finite)
        if ok:
            self.last = vals[:-1]
            self.good.copy_(self.x.detach())
        elif not self.last:
            self.last = [math.nan] * (len(vals) - 1)
        return terms[0].detach(), ok

    def _closure(self) -> torch.Tensor:
        loss, ok = self._evaluate()
        if not ok:  # zero gradient: L-BFGS returns before moving (max|g| <= tolerance_grad)
            self.bad = True
            assert self.x.grad is not None
            self.x.grad.zero_()
            return torch.zeros((), device=self.x.device)
        return loss

    def step(self) -> list[float]:
        self.bad = False
        with torch.enable_grad():
            if self.kind == "adam":
                _, ok = self._evaluate()
                self.bad = not ok
                if ok:
                    self.opt.step()
            else:
                self.opt.step(self._closure)  # type: ignore[arg-type]
        with torch.no_grad():
            if self.bad:
                self._recover()
            else:
                self.streak = 0
                if self.kind == "lbfgs":
                    self._cap_step()
            self.x.clamp_(0, 1)
            if self.average is not None and not self.bad:
                self.average.update(self.x)
        return list(self.last)

    def result(self) -> torch.Tensor:
        """What this scale delivers: the average of the iterates (Adam with an EMA), else x."""
        if self.average is not None:
            return self.average.get()
        return self.x.detach()

    def _cap_step(self) -> None:
        """Shrink an L-BFGS step whose largest pixel change exceeds max_step, on the device.

        Departure from Gatys and jcjohnson (L-BFGS with lr 1 and no line search): a curvature pair
        with y.s barely positive (common where the style term is non-convex near a content init)
        gives a step of 10-100x the pixel range, and the loss jumps by orders of magnitude. This is
        a trust region in place of a line search: one evaluation per iteration still. The step
        length is shrunk in L-BFGS's own state too, so its next curvature pair is the step taken.
        """
        delta = self.x - self.good  # (B, C, H, W); good is the iterate the step started from
        shrink = (self.max_step / delta.abs().amax().clamp_min(1e-30)).clamp(max=1.0)  # 0-dim
        self.x.sub_(delta.mul_(1.0 - shrink))  # x unchanged, bit for bit, when shrink == 1
        state = self.opt.state[self.x]
        if "t" in state:  # absent when L-BFGS returned without a step (an all-zero gradient)
            state["t"] = state["t"] * shrink

    def _recover(self) -> None:
        """Non-finite loss or gradient: back to the last good iterate and halve the step; after
        max_recoveries in a row with no finite step between, give up (EngineError "diverged")."""
        self.streak += 1
        if self.streak > self.max_recoveries:
            raise diverged(self.streak, self.lr)
        self.recoveries += 1
        self.lr *= 0.5
        logger.warning(
            "non-finite loss or gradient: restored the last good image, lr -> %g (recovery %d)",
            self.lr,
            self.recoveries,
        )
        self.x.copy_(self.good)  # in place: the optimiser still holds self.x
        if self.kind == "adam":
            # Keep Adam's moments (the bad step never reached opt.step(), so they are finite and
            # describe the path up to the good image): a fresh Adam's first update is
            # lr * g / |g|, a jump of +-lr on every pixel at once. Only the step size changes.
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        else:
            # L-BFGS: drop the curvature history, which would aim the same way as the step that
            # went bad; a fresh L-BFGS starts with a small gradient step, lr * g / sum|g|.
            self.opt = self._new_optimizer()

    def state(self) -> dict[str, Any] | None:
        """A detached copy of the optimiser state for a checkpoint (None when L-BFGS's is too big)."""
        sd = self.opt.state_dict()
        if self.kind == "lbfgs" and _tensor_bytes(sd) > LBFGS_STATE_LIMIT_BYTES:
            logger.info("L-BFGS state is %d MB: not checkpointed", _tensor_bytes(sd) >> 20)
            return None
        cloned: dict[str, Any] = _clone(sd)
        return cloned


class IterateAverage:
    """A bias-corrected exponential moving average of the iterate, as Adam's moments are (Kingma &
    Ba; crowsonkb/style-transfer-pytorch averages with decay 0.99). Adam at a fixed lr keeps
    jittering by ~lr around the minimum; the average of the last ~1/(1 - decay) iterates does not.
    Started at the scale's first image; updated after every finite step."""

    def __init__(self, x: torch.Tensor, decay: float, state: dict[str, Any] | None = None) -> None:
        self.decay = decay
        if state is not None:  # resuming mid-scale
            self.value, self.accum = state["value"].to(x.device).clone(), float(state["accum"])
        else:
            self.value, self.accum = torch.zeros_like(x), 1.0
            self.update(x)

    def update(self, x: torch.Tensor) -> None:
        self.accum *= self.decay  # a host float: no device sync
        self.value.mul_(self.decay).add_(x.detach(), alpha=1.0 - self.decay)

    def get(self) -> torch.Tensor:
        avg: torch.Tensor = (self.value / (1.0 - self.accum)).clamp_(0, 1)
        return avg

    def state(self) -> dict[str, Any]:
        return {"value": self.value.detach().cpu().clone(), "accum": self.accum}


def diverged(steps: int, lr: float) -> EngineError:
    return EngineError(
        "diverged",
        f"the optimisation diverged: the loss or its gradient was NaN or infinite at {steps} "
        f"consecutive steps, and restoring the last good image and halving lr (now {lr:g}) did not "
        "help; try a lower lr or lower content/style/tv weights",
    )


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.copy(obj)


def resize_adam_state(state: dict[str, Any], hw: tuple[int, int]) -> dict[str, Any]:
    """Adam moments resized to a new scale, as crowsonkb/style-transfer-pytorch does: first moment
    bicubic, second moment bilinear and kept non-negative."""
    state = _clone(state)
    for s in state["state"].values():
        s["exp_avg"] = F.interpolate(s["exp_avg"], size=hw, mode="bicubic", align_corners=False)
        sq = F.interpolate(s["exp_avg_sq"], size=hw, mode="bilinear", align_corners=False)
        s["exp_avg_sq"] = sq.relu_()
    return state
