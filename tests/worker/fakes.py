"""A fake engine with the real engine's callback contract: Progress each iteration, Checkpoint at scale
ends, exceptions from callbacks propagating unchanged out of ``run``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from worker.engine import Checkpoint, EngineError, Progress


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
        self.styles: list[Any] = []  # the styles of each run

    def run(
        self,
        content: Any,
        styles: Any,
        config: Any,
        *,
        masks: Any = None,
        on_progress: Any = None,
        on_checkpoint: Any = None,
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
            on_progress(
                Progress(
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
            )
            if it + 1 == self.iterations:
                on_checkpoint(
                    Checkpoint(
                        scale=scale,
                        iteration=it + 1,
                        step=step,
                        image=torch.rand(1, 3, 16, 16),
                        optimizer_state=None,
                        config_digest="d",
                        end_of_scale=True,
                    )
                )
        return FakeResult(Image.new("RGB", (32, 32), (200, 10, 10)))
