"""bench/gpu.py's L-BFGS section: the per-item direction (worker.engine.batched_lbfgs) in the solved
form (two triangular solves over the history's Gram matrices, a fixed ~40 kernels; an option) against
torch's order of the two-loop recursion (the default: pair by pair, ~25 kernels per pair at history 50),
on one full history, side by side in one run: seconds per direction, the ratio, and how far the two
directions are apart (float rounding only).

Imports only the standard library, torch and worker.engine."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from gpu_common import Plan, say, sync

from worker.engine import TransferConfig
from worker.engine.batched_lbfgs import BatchedLBFGS, two_loop_direction

REPS = 10  # timed calls of each form, interleaved


def _full_history(batch: int, size: int, history: int, device: str) -> tuple[BatchedLBFGS, torch.Tensor]:
    """An optimiser whose rings are full (each item's newest pair at its own slot) and a gradient."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.zeros(batch, 3, size, size, device=device)
    opt = BatchedLBFGS(x, history)
    n = x[0].numel()
    for b in range(batch):  # y = s scaled by a positive curvature: y.s > 0, as kept pairs have
        s = torch.randn(history, n, generator=gen).to(device) * 1e-2
        opt.S[b], opt.Y[b] = s, s * (1 + torch.rand(history, 1, generator=gen).to(device))
    opt.rho = 1.0 / (opt.S * opt.Y).sum(dim=2)
    opt.head = torch.arange(batch, device=device) % history
    opt.count.fill_(history)
    opt.n_iter.fill_(history + 1)
    opt.iters = history + 1
    return opt, torch.randn(batch, n, generator=gen).to(device)


def _seconds(plan: Plan, call: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor) -> float:
    sync(plan)
    t = time.perf_counter()
    call(g)
    sync(plan)
    return time.perf_counter() - t


def _compare(plan: Plan, batch: int, size: int, history: int) -> str:
    opt, g = _full_history(batch, size, history, plan.device)

    def loop(grad: torch.Tensor) -> torch.Tensor:
        return two_loop_direction(opt, grad)

    ref = loop(g)
    rel = float(((opt.solved_direction(g) - ref).norm(dim=1) / ref.norm(dim=1)).max())
    solved_t, loop_t = [], []
    for _ in range(REPS):
        solved_t.append(_seconds(plan, opt.solved_direction, g))
        loop_t.append(_seconds(plan, loop, g))
    solved, looped = sorted(solved_t)[REPS // 2], sorted(loop_t)[REPS // 2]  # medians
    return (
        f"lbfgs direction B={batch:<3} solved {solved * 1e3:8.3f} ms  two-loop {looped * 1e3:8.3f} ms  "
        f"speed-up {looped / solved:5.2f}x  max relative difference {rel:.1e}"
    )


def direction_lines(plan: Plan) -> None:
    history = TransferConfig().lbfgs_history
    size = max(plan.sizes)
    say(f"\n# L-BFGS direction, history {history} full, {size} px, fp32: solved form vs torch's order")
    for batch in (1, 2) if plan.quick else (1, 16):
        try:
            say(_compare(plan, batch, size, history))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            say(f"lbfgs direction B={batch}: failed ({type(exc).__name__}: {str(exc)[:120]})")
