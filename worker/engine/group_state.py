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


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def members_for(
    seeds: Sequence[int],
    digests: Sequence[str],
    progress: Sequence[Callable[[Progress], Any] | None],
    checkpoints: Sequence[Callable[[Checkpoint], Any] | None],
) -> list[Member]:
    return [
        Member(i, seed, digest, p, c)
        for i, (seed, digest, p, c) in enumerate(zip(seeds, digests, progress, checkpoints, strict=True))
    ]


__all__ = ["Member", "ScaleRun", "col", "members_for"]
