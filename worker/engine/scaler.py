"""Dynamic loss scaling for precision="fp16", as torch.amp.GradScaler does it, for the image gradient.

Why: the losses are means over C*H*W, so the gradients flowing back through an fp16 VGG are tiny:
with the normalised objective (losses.LossFn) the median |dL/dfeature| measured 3e-7 to 7e-6 at
96 px (random weights), and they scale like 1/(H*W): about 1e-8 to 2e-7 at 512 px, where most fall
below fp16's smallest subnormal (6e-8) and flush to zero. Zeros are not NaN, so the NaN guard never
fires: the image just stops moving. bf16 has fp32's exponent range and needs none of this.

How: backward() runs on loss * scale (a power of two, so unscaling is exact); the fp32 image
gradient is divided by it before the optimiser sees it. A gradient that overflowed (inf/NaN from
a finite loss) halves the scale and the same point is evaluated again, so L-BFGS's closure always
returns a true gradient; GradScaler skips the optimiser step instead, which a closure cannot. Every
GROWTH_INTERVAL finite evaluations in a row the scale doubles (the gradient shrinks as the loss
falls, by 10-100x within a scale).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale
# GradScaler grows every 2000 steps; a whole default job is ~815 iterations, and one failed growth
# costs one extra evaluation, so 50 costs at most 2 % more evaluations.
GROWTH_INTERVAL = 50
MIN_SCALE = 1.0  # a gradient that overflows fp16 unscaled is left to the NaN guard
MAX_SCALE = 2.0**32  # bounded even for an all-zero gradient (weights 0); loss * 2**32 is fine in fp32


@dataclass
class LossScaler:
    """The current scale and the finite evaluations since it last changed (checkpointed)."""

    scale: float = INIT_SCALE
    good: int = 0

    def retry(self, loss_finite: bool, grad_finite: bool) -> bool:
        """Update after a backward at ``scale``; True: the gradient overflowed, evaluate again (the
        scale was halved). A non-finite loss, or an overflow at MIN_SCALE, is the NaN guard's."""
        if grad_finite:
            self.good += 1
            if self.good >= GROWTH_INTERVAL and self.scale < MAX_SCALE:
                self.scale, self.good = self.scale * 2.0, 0
            return False
        if loss_finite and self.scale > MIN_SCALE:
            self.scale, self.good = max(self.scale * 0.5, MIN_SCALE), 0
            return True
        return False

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> LossScaler:
        if not state:
            return cls()
        scale = float(state.get("scale", INIT_SCALE))
        if not (math.isfinite(scale) and MIN_SCALE <= scale <= MAX_SCALE):
            scale = INIT_SCALE
        return cls(scale=scale, good=int(state.get("good", 0)))
