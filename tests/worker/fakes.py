"""A fake engine with the real engine's callback contract (``worker.engine_port.EnginePort``, checked by
mypy below): Progress each iteration, Checkpoint at scale ends and at an iteration whose
``on_progress`` returned ``CHECKPOINT_NOW``, exceptions from callbacks propagating unchanged out of
``run``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from worker.engine import CHECKPOINT_NOW, Checkpoint, EngineError, Progress, TransferConfig
from worker.engine_port import CheckpointCallback, EnginePort, ProgressCallback


@dataclass
class FakeResult:
    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


class FakeEngine:
    def __init__(self, scales: int = 2, iterations: int = 3, delay_s: float = 0.0) -> None:
        self.scales, self.iterations, self.delay_s = scales, iterations, delay_s
        self.resumed_from: list[int | None] = []
        self.error: Exception | None = None
        self.masks: list[Any] = []  # the ``masks`` of each run (None when none was passed)
        self.styles: list[Sequence[Image.Image]] = []  # the styles of each run

    def run(
        self,
        content: Image.Image,
        styles: Sequence[Image.Image],
        config: TransferConfig,
        *,
        masks: Sequence[Image.Image] | None = None,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        resume: Checkpoint | None = None,
    ) -> FakeResult:
        self.resumed_from.append(resume.step if resume is not None else None)
        self.masks.append(masks)
        self.styles.append(styles)
        if masks is not None and len(masks) != len(styles):  # the engine's contract
            raise EngineError("invalid_mask", f"{len(masks)} masks for {len(styles)} styles")
        total = self.scales * self.iterations
        start = resume.step if resume is not None else 0
        for step in range(start + 1, total + 1):
            if self.error is not None:
                raise self.error
            scale, it = divmod(step - 1, self.iterations)
            time.sleep(self.delay_s)
            progress = Progress(
                scale=scale,
                scales=self.scales,
                size=(16, 16),
                iteration=it + 1,
                iterations=self.iterations,
                step=step,
                total_steps=total,
                loss=1.0 / step,
                content_loss=0,
                style_loss=0,
                tv_loss=0,
                elapsed=0,
                lr=1,
                recoveries=0,
            )
            asked = on_progress is not None and on_progress(progress) == CHECKPOINT_NOW
            end = it + 1 == self.iterations
            if on_checkpoint is not None and (end or asked):  # as the engine: at most one per iteration
                on_checkpoint(
                    Checkpoint(
                        scale=scale,
                        iteration=it + 1,
                        step=step,
                        image=torch.rand(1, 3, 16, 16),
                        optimizer_state=None,
                        config_digest="d",
                        end_of_scale=end,
                    )
                )
        return FakeResult(Image.new("RGB", (32, 32), (200, 10, 10)))


# mypy checks that the fake fits the seam the runner uses, as the real engine does (worker/runner.py).
_FITS_THE_SEAM: EnginePort = FakeEngine()


def checkpoint(step: int, end_of_scale: bool = False, hw: tuple[int, int] = (8, 8)) -> Checkpoint:
    """A small checkpoint at ``step`` (an ``hw`` image, 8 x 8 by default; no optimiser state)."""
    return Checkpoint(
        scale=0,
        iteration=step,
        step=step,
        image=torch.rand(1, 3, *hw),
        optimizer_state=None,
        config_digest="d",
        end_of_scale=end_of_scale,
    )
