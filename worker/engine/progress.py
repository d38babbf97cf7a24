"""What leaves the engine as it runs: a ``Progress`` per reported iteration, and the ``CHECKPOINT_NOW``
answer with which a callback asks for a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

# An on_progress callback may return this to have a checkpoint written at the iteration it was told
# about (a worker shutting down hands its job back with no work lost).
CHECKPOINT_NOW = "checkpoint_now"


@dataclass(frozen=True)
class Progress:
    """Passed to on_progress after every iteration. Losses are weighted and summed over the batch.

    The ``*_removed`` fields are the fraction of that term removed since this scale's first
    evaluation, 1 - now / start (negative if it grew; None where it started at 0, such as the
    content term at a content init, or a term whose weight is 0). With Adam's EMA (ema_decay) the
    losses are those of the optimiser's own iterate; the delivered image is the average, which
    trails it by ~1 / (1 - decay) steps (no extra VGG pass is spent to evaluate it).
    """

    scale: int  # 0-based scale index
    scales: int
    size: tuple[int, int]  # (h, w) of this scale
    iteration: int  # 1-based within the scale
    iterations: int  # in this scale
    step: int  # global, 1-based
    total_steps: int
    loss: float
    content_loss: float
    style_loss: float
    tv_loss: float
    elapsed: float  # seconds since the run started
    lr: float
    recoveries: int  # NaN/Inf recoveries so far
    loss_removed: float | None = None
    content_removed: float | None = None
    style_removed: float | None = None
    tv_removed: float | None = None
    # a group's member that ended this scale before the others: its last progress again, sent at
    # each of the group's reads while it waits (nothing changed; a cancel can reach it)
    waiting: bool = False


__all__ = ["CHECKPOINT_NOW", "Progress"]
