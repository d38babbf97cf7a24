"""The state a group's pyramid (group.py) keeps per member and per scale."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batched import BatchedAdam, BatchedAverage, BatchedLBFGS
from .checkpoint import Checkpoint
from .objective import LossFn
from .progress import Progress


@dataclass
class Member:
    """One job of a group as the pyramid tracks it (index: its place in the caller's list)."""

    index: int
    seed: int
    digest: str
    on_progress: Callable[[Progress], Any] | None
    on_checkpoint: Callable[[Checkpoint], Any] | None
    error: BaseException | None = None  # set: out of the group (diverged, or a callback raised)
    resume: Checkpoint | None = None  # the single-job checkpoint it resumes from (group_resume.py)
    # where it stands at the start of the group's current scale: iterations of that scale it ran
    # before (a mid-scale resume), its step count, and the steps it has taken in this group
    done: int = 0
    step: int = 0
    ran: int = 0

    def remaining(self, iters: int) -> int:
        """Iterations of a scale of ``iters`` left to it."""
        return iters - self.done


@dataclass
class ScaleRun:
    """One scale's loop state."""

    s: int
    hw: tuple[int, int]
    iters: int
    loss_fn: LossFn
    opt: BatchedAdam | BatchedLBFGS
    avg: BatchedAverage | None
    last: torch.Tensor  # (B, 3)
    started: torch.Tensor  # (B,) the objective's divisor taken
    active: torch.Tensor  # (B,) still stepping
    read_at: int = 0  # the scale's iteration (k) at the latest host read


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def members_for(
    seeds: Sequence[int],
    digests: Sequence[str],
    progress: Sequence[Callable[[Progress], Any] | None],
    checkpoints: Sequence[Callable[[Checkpoint], Any] | None],
    resumes: Sequence[Checkpoint | None] | None = None,
) -> list[Member]:
    starts = resumes if resumes is not None else [None] * len(seeds)
    rows = zip(seeds, digests, progress, checkpoints, starts, strict=True)
    return [Member(i, seed, digest, p, c, resume=r) for i, (seed, digest, p, c, r) in enumerate(rows)]


__all__ = ["Member", "ScaleRun", "col", "members_for"]
