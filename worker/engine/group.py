"""A group of independent jobs run as one batch (GroupPyramid), each settled on its own.

A single job's batch (pyramid.Pyramid) shares one learning rate, one NaN guard and, with L-BFGS, one
curvature history across its images. A group must not: its items are other tenants' jobs. Here every
item has its own lr, recovery streak and optimiser state (batched.py), its own seed, digest,
callbacks, checkpoints and outcome, and the finite check is per item, so item b ends with the image a
run of b alone gives (to float rounding), whatever else is in the group:

* a non-finite evaluation of item b restores b's last good image and halves b's lr; the others step;
* an item whose callback raises (the worker's cancel or fencing signal) or that diverges is masked
  out at once (its updates stop; its gradient never reached the others) and dropped from the batch
  at the next scale boundary;
* per-item checkpoints are in the single-job format (batched.py exports torch optimiser states), so
  an item resumes alone; and a member may resume from such a checkpoint, made alone or in any other
  group (group_resume.py: the members start at one scale, each at its own iteration; one that ends
  a scale first waits, masked out, told its last progress again at each read: ``waiting``).

Host reads: the loop keeps its values on the device and reads them every ``report_every`` iterations
and at each scale's end (progress, divergence, checkpoints); in between a step is a fixed sequence of
kernels with no sync. On CUDA a read is one non-blocking copy to pinned memory and an event wait
(readback.py) rather than a blocking ``.tolist()`` per tensor. Departure from a single run: divergence
is noticed at those reads, so an item may take up to ``report_every`` more restored steps before it
fails, and a ``save_every`` checkpoint falls at the first read at or past its iteration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from . import group_resume as resume
from .batched import BatchedAdam, BatchedAverage, BatchedLBFGS
from .errors import EngineError, GroupAborted
from .group_state import Member, ScaleRun, col
from .images import resize
from .objective import LossFn
from .optim import diverged
from .progress import CHECKPOINT_NOW
from .pyramid import Pyramid
from .readback import PinnedReadback

logger = logging.getLogger(__name__)


class GroupPyramid(Pyramid):
    """Pyramid over a group; ``members`` parallel to ``items``. ``run_group()`` -> (B, C, H, W) of
    every member (rows of members that left hold their last image)."""

    def __init__(
        self,
        *args: Any,
        members: list[Member],
        report_every: int = 1,
        lbfgs_solved: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, on_progress=None, on_checkpoint=None, **kwargs)
        if self.scaler is not None:
            raise EngineError("invalid_config", "fp16 jobs run alone (loss scaling is per batch)")
        self.members, self.report_every = members, max(1, report_every)
        self.lbfgs_solved = lbfgs_solved  # L-BFGS directions in the solved form (batched_lbfgs.py)
        b = len(members)
        self.lrs = torch.full((b,), self.lr, device=self.device, dtype=torch.float64)
        self.streaks = torch.zeros(b, dtype=torch.long, device=self.device)
        self.counts = torch.zeros(b, dtype=torch.long, device=self.device)  # recoveries per item
        self.results: dict[int, torch.Tensor] = {}  # member index -> its final image
        self.readback: PinnedReadback | None = None  # this scale's (CUDA only: _readback)

    def _init_image(self, hw: tuple[int, int]) -> torch.Tensor:
        if self.cfg.init != "noise":
            return super()._init_image(hw)
        # noise from each item's own seed: its start does not depend on its place in the group
        gens = [torch.Generator().manual_seed(m.seed) for m in self.members]
        return torch.cat([torch.rand((1, self.channels, *hw), generator=g) for g in gens]).to(self.device)

    def run_group(self) -> None:
        x: torch.Tensor | None = None
        adam: BatchedAdam | None = None
        first = resume.first_scale(self.members, len(self.schedule))
        resume.place(self.members, self.lrs, self.counts)
        for s in range(first, len(self.schedule)):
            hw = self.schedule[s][0]
            if x is not None:
                x, adam = self._compact(x, adam)
                if x is None:
                    return  # every member left
                x = resize(x, hw)
                if adam is not None:
                    adam.resized(hw)
            else:
                x = resume.start_image(self, hw)
                adam = resume.start_adam(self, x, hw)
            x, adam = self._scale(s, x, adam, s == first)
            if all(m.error is not None for m in self.members):
                return
        assert x is not None
        for b, m in enumerate(self.members):
            if m.error is None:
                self.results[m.index] = self.finish_item(x[b : b + 1], b).detach()

    def _compact(
        self, x: torch.Tensor, adam: BatchedAdam | None
    ) -> tuple[torch.Tensor | None, BatchedAdam | None]:
        """Drop the members that left (the batch shrinks only at a scale boundary)."""
        keep = [b for b, m in enumerate(self.members) if m.error is None]
        if len(keep) == len(self.members):
            return x, adam
        if not keep:
            return None, None
        index = torch.tensor(keep, device=self.device)
        self.members = [self.members[b] for b in keep]
        self.items = [self.items[b] for b in keep]
        self.lrs, self.streaks, self.counts = self.lrs[index], self.streaks[index], self.counts[index]
        if adam is not None:
            adam.keep(index)
        return x[index], adam

    def _scale(
        self, s: int, x0: torch.Tensor, adam: BatchedAdam | None, first: bool
    ) -> tuple[torch.Tensor, BatchedAdam | None]:
        """One scale; ``first``: the group's first, where resumed members bring their state."""
        hw, iters = self.schedule[s]
        cfg = self.cfg
        loss_fn = LossFn(self.model, self.targets(hw), self.style_weights, self.cast, self.channels_last)
        x = x0.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
        good = x.detach().clone()
        b = x.shape[0]
        opt: BatchedAdam | BatchedLBFGS
        if cfg.optimizer == "adam":
            keep = adam is not None and (first or cfg.carry_optimizer_state)
            opt = adam if keep and adam is not None else BatchedAdam(x, cfg.betas)
        else:
            opt = BatchedLBFGS(x.detach(), cfg.lbfgs_history, solved=self.lbfgs_solved)
        avg = (
            BatchedAverage(x.detach(), cfg.ema_decay)
            if cfg.optimizer == "adam" and cfg.ema_decay > 0
            else None
        )
        last = torch.full((b, 3), float("nan"), device=self.device)  # last finite (content, style, tv)
        started = torch.zeros(b, dtype=torch.bool, device=self.device)
        active = torch.ones(b, dtype=torch.bool, device=self.device)
        run = ScaleRun(s, hw, iters, loss_fn, opt, avg, last, started, active)
        if first:
            resume.load_mid_scale(self.members, run)
        self.readback = self._readback(b)
        left = [m.remaining(iters) for m in self.members]  # members resumed mid-scale have fewer
        ends = set(left)
        k = 0
        while k < max((n for n, m in zip(left, self.members, strict=True) if m.error is None), default=0):
            k += 1
            self._iterate(run, x, good)
            self.step += 1
            if k in ends or k % self.report_every == 0:
                self._read(run, x, k, left)
        for m, n in zip(self.members, left, strict=True):
            m.step, m.ran, m.done = m.step + n, m.ran + n, 0
        result = avg.get() if avg is not None else x.detach()
        return result, opt if isinstance(opt, BatchedAdam) else None

    def _iterate(self, run: ScaleRun, x: torch.Tensor, good: torch.Tensor) -> None:
        """One evaluation and one step of every member still active; no host reads."""
        with torch.enable_grad():
            x.grad = None
            terms = run.loss_fn(x)
            torch.autograd.backward(terms[0])
        assert x.grad is not None and run.loss_fn.per_image is not None
        grad, per_image = x.grad, run.loss_fn.per_image
        # finite per item: its three terms and its gradient's sum (a single run checks the same)
        ok = per_image.isfinite().all(dim=1) & grad.flatten(1).sum(dim=1).isfinite()
        take = ok & run.active
        with torch.no_grad():
            run.started |= ok
            run.loss_fn.retake = ~run.started
            run.last = torch.where(ok[:, None], per_image, run.last)
            good.copy_(torch.where(col(ok, x), x.detach(), good))
            # Adam takes lr in float64 (a single run's step size is lr / bias correction on host
            # floats); L-BFGS scales its direction in x's dtype, as torch's does
            lr = self.lrs if isinstance(run.opt, BatchedAdam) else self.lrs.to(x.dtype)
            run.opt.step(x.detach(), grad.detach(), lr, take)
            if isinstance(run.opt, BatchedLBFGS):
                self._cap(run.opt, x, good, take)
            bad = ~ok & run.active
            self._recover(run, x, good, bad)
            x.clamp_(0, 1)
            if run.avg is not None:
                run.avg.update(x.detach(), take)

    def _cap(self, opt: BatchedLBFGS, x: torch.Tensor, good: torch.Tensor, take: torch.Tensor) -> None:
        """optim.Stepper._cap_step per item: shrink a step whose largest pixel change exceeds max_step."""
        delta = x.detach() - good  # zero for items that did not step
        biggest = delta.flatten(1).abs().amax(dim=1).clamp_min(1e-30)
        shrink = torch.where(take, (self.cfg.lbfgs_max_step / biggest).clamp(max=1.0), 1.0)
        x.sub_(delta * (1.0 - col(shrink, x)))
        opt.scale_last_step(shrink)

    def _recover(self, run: ScaleRun, x: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> None:
        """optim.Stepper._recover per item: back to the last good image, half the lr, a fresh
        L-BFGS history (Adam keeps its moments); a finite step ends the item's streak."""
        x.copy_(torch.where(col(bad, x), good, x.detach()))
        self.lrs = torch.where(bad, self.lrs * 0.5, self.lrs)
        self.streaks = torch.where(bad, self.streaks + 1, torch.where(run.active, 0, self.streaks))
        self.counts = self.counts + bad.long()
        if isinstance(run.opt, BatchedLBFGS):
            run.opt.reset(bad)

    def _readback(self, rows: int) -> PinnedReadback | None:
        """The pinned reader of a scale with ``rows`` members, on CUDA; None: the plain read (pinned
        memory needs a CUDA device). Its width: last (3), lr, streak, recoveries, started, start (3)."""
        return PinnedReadback(rows, 10) if self.device.type == "cuda" else None

    def _values(self, run: ScaleRun) -> list[Any]:
        """[last, lrs, streaks, counts, started, starts] as host lists (starts: None until taken)."""
        start = run.loss_fn.start
        if self.readback is None or start is None:  # start: set by the scale's first evaluation
            return [
                run.last.tolist(),
                self.lrs.tolist(),
                self.streaks.tolist(),
                self.counts.tolist(),
                run.started.tolist(),
                start.tolist() if start is not None else None,
            ]
        self.readback.stage([run.last, self.lrs, self.streaks, self.counts, run.started, start])
        return self.readback.read()

    def _read(self, run: ScaleRun, x: torch.Tensor, k: int, left: list[int]) -> None:
        """The host read after the scale's k-th iteration: progress, divergence and checkpoints of
        every member; ``left``: each member's iterations in this scale (one whose last this is ends
        its scale here and waits, masked out, for the others: it reports its last progress again,
        marked ``waiting``, so that a cancel reaches it while it waits)."""
        values = self._values(run)
        for b, m in enumerate(self.members):
            if m.error is None:
                self._read_member(run, x, b, (k, left[b]), k < max(left), values)
        run.read_at = k

    def _read_member(
        self, run: ScaleRun, x: torch.Tensor, b: int, at: tuple[int, int], more: bool, values: list[Any]
    ) -> None:
        """Member b at the read after the scale's ``at = (k, left)``: its k-th of ``left`` iterations,
        or its last if k is past it (it waits); ``more``: others go on after this read."""
        last, lrs, streaks, counts, started, starts = values
        m, waiting, end = self.members[b], at[0] > at[1], at[0] == at[1]
        k = min(at)
        if streaks[b] > self.cfg.max_recoveries:
            self._leave(run, b, diverged(streaks[b], lrs[b]))
            return
        it, step = m.done + k, m.step + k
        start = [starts[b]] if starts is not None and started[b] else None  # None: not taken yet
        vals = [sum(last[b]), *last[b]]
        progress = self.progress(run.s, it, vals, start, lr=lrs[b], recoveries=counts[b], step=step)
        ok, asked = self._callback(run, b, m.on_progress, replace(progress, waiting=waiting))
        if ok and m.on_checkpoint is not None and not waiting and self._due(m, run, k, end, asked):
            ckpt = resume.item_checkpoint(self, run, b, x, (it, step, end), start, lrs[b], counts[b])
            ok, _ = self._callback(run, b, m.on_checkpoint, ckpt)
        if not ok:
            return
        if end and run.s == len(self.schedule) - 1 and streaks[b] >= m.ran + k:
            self._leave(run, b, diverged(streaks[b], lrs[b]))  # not one finite step in the run
        elif end and more:
            run.active[b] = False  # its scale is done: it waits for the others'

    def _callback(self, run: ScaleRun, b: int, fn: Callable[[Any], Any] | None, arg: Any) -> tuple[bool, Any]:
        """``fn(arg)``, member b's callback, and whether b goes on: an exception it raises stops b
        only (its error), except ``GroupAborted``, which ends the group. Only the callback is inside
        the ``try``: an exception of the engine's own is no member's."""
        try:
            return True, fn(arg) if fn is not None else None
        except GroupAborted:  # the caller's deadline, say
            raise
        except Exception as exc:  # noqa: BLE001 - a member's callback stops that member only
            self._leave(run, b, exc)
            return False, None

    def _due(self, m: Member, run: ScaleRun, k: int, end: bool, asked: Any) -> bool:
        """A checkpoint of m is due at its k-th iteration: its scale's end, asked for, or a multiple
        of ``save_every`` passed since the previous read (reads come every ``report_every``
        iterations and a member resumed mid-scale counts from its own iteration)."""
        every = self.cfg.save_every
        since = m.done + min(run.read_at, k)  # m's iteration at the previous read
        return end or asked == CHECKPOINT_NOW or bool(every and (m.done + k) // every > since // every)

    def _leave(self, run: ScaleRun, b: int, error: BaseException) -> None:
        expected = isinstance(error, EngineError) or type(error).__name__ == "JobStopped"
        logger.log(
            logging.INFO if expected else logging.WARNING,
            "group member %d left at step %d: %r",
            self.members[b].index,
            self.step,
            error,
            exc_info=None if expected else error,
        )
        # Without its traceback: the frames it holds (this loop's tensors, the L-BFGS history)
        # would outlive the group through the exception until a full garbage collection.
        self.members[b].error = error.with_traceback(None)
        run.active[b] = False

    def finish_item(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Pyramid.finish for member b's (1, C, h, w) image."""
        if self.channels == 3:
            return x
        items, self.items = self.items, [self.items[b]]
        try:
            return self.finish(x)
        finally:
            self.items = items


__all__ = ["GroupPyramid"]
