"""The engine controls a job may set (the ``params`` of ``POST /v1/jobs``), validated once here.

The API validates with this model (it never imports torch); the worker turns the stored dump into the
engine's ``TransferConfig``. Unknown keys are rejected, so a typo is a 422, not a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

OutputFormat = Literal["png", "jpeg", "webp"]

# Mirrors of worker.engine.schedule (the API never imports the engine; tests/engine checks they agree).
MIN_SCALE_FACTOR = 1.1  # below this a job is many near-identical scales, each a VGG pass + checkpoint
MAX_SCALE_FACTOR = 4.0
HARD_MAX_SCALES = 64  # the model's own ceiling; the configured limit (max_scales, 16) is checked later
MIN_SIDE = 16  # VGG19 up to relu5_1 has 4 max pools: every side of every scale must be >= 2**4
MAX_EDGE = 65_536  # no image has a longer side; the configured max_size (2048) is checked later
MAX_ITERATIONS_PER_SCALE = 100_000
ADAM_FIRST, ADAM_LATER, ADAM_EDGE = 1000, 500, 512  # Adam's (worker.engine.schedule.auto_counts)
# The W2 style loss costs one eigendecomposition per style layer per iteration, whatever the image
# size: measured on the 2-core CPU about as much as a VGG19 pass over a 256 x 256 image.
W2_WORK_PER_ITERATION = 256 * 256
DEFAULT_MIN_SIZE = 128  # the first scale's long edge unless given (or size, when size is smaller)

# Weights are finite and bounded: NaN, Infinity and 1e400 are refused (PostgreSQL's JSON cannot
# store them, and they make no picture).
Weight = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Edge = Annotated[int, Field(ge=MIN_SIDE, le=MAX_EDGE)]
Iterations = Annotated[int, Field(ge=1, le=MAX_ITERATIONS_PER_SCALE)]


def _too_many_scales(count: int, limit: int, how: str) -> PydanticCustomError:
    return PydanticCustomError(
        "too_many_scales",
        "{how} gives {count} scales; the maximum is {limit}: raise scale_factor or min_size",
        {"how": how, "count": count, "limit": limit},
    )


def long_edges(size: int, min_size: int, scale_factor: float, max_scales: int = HARD_MAX_SCALES) -> list[int]:
    """The long edge of each scale, ``min_size`` up to ``size`` by ``scale_factor``: the same rule as
    ``worker.engine.schedule.long_edges``. The number of scales is computed in closed form first, so
    a factor near 1 is refused at once instead of looping ~1e16 times."""
    if min_size >= size:
        return [size]
    if not MIN_SCALE_FACTOR <= scale_factor <= MAX_SCALE_FACTOR:
        raise PydanticCustomError(
            "scale_factor_range",
            "scale_factor must be between {lo} and {hi}",
            {"lo": MIN_SCALE_FACTOR, "hi": MAX_SCALE_FACTOR},
        )
    target = size * (1 - 1e-6)
    # closed form: edge k is min_size * f**k; the loop below appends those under target
    steps = math.ceil(math.log(target / min_size) / math.log(scale_factor))
    how = f"scale_factor {scale_factor:g} from {min_size} to {size} px"
    if steps > max_scales:
        raise _too_many_scales(steps + 1, max_scales, how)
    edges: list[int] = []
    edge = float(min_size)
    for _ in range(steps + 2):  # bounded; float rounding may need one step more than the closed form
        if edge >= target:
            break
        edges.append(round(edge))
        edge *= scale_factor
    if edges and size / edges[-1] < scale_factor**0.5:
        edges.pop()  # no near-duplicate last scale
    edges.append(size)
    if len(edges) > max_scales:
        raise _too_many_scales(len(edges), max_scales, how)
    return edges


def fit_long_edge(wh: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(w, h) with the aspect ratio of ``wh`` and the given long edge (the engine's rounding)."""
    w, h = wh
    if w >= h:
        return long_edge, max(1, round(h * long_edge / w))
    return max(1, round(w * long_edge / h)), long_edge


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    size: Edge = Field(512, description="long edge of the result in pixels")
    min_size: Edge = Field(
        DEFAULT_MIN_SIZE,
        description=f"long edge of the first (coarsest) scale; when not given, {DEFAULT_MIN_SIZE} or "
        "size if size is smaller (then one scale); a given min_size above size is refused",
    )
    scale_factor: float = Field(
        2**0.5,
        ge=MIN_SCALE_FACTOR,
        le=MAX_SCALE_FACTOR,
        description="ratio of consecutive scales' long edges",
    )
    scales: list[Edge] | None = Field(
        None, min_length=1, max_length=HARD_MAX_SCALES, description="explicit long edges, smallest first"
    )
    iterations: Iterations | list[Iterations] | None = Field(
        None,
        description="per scale: one value for every scale, a list, or null for the default",
    )
    style_weights: list[Weight] | None = Field(
        None, max_length=64, description="blend weights, one per style"
    )
    content_weight: Weight | None = Field(None, description="default 1 (relative terms)")
    style_weight: Weight | None = Field(None, description="default 10 (relative terms)")
    tv_weight: Weight | None = Field(None, description="default 0.01 (relative terms)")
    loss_terms: Literal["relative", "raw"] = Field(
        "relative",
        description="relative: each loss term divided by its target's energy, so the "
        "weights mean the same for every model; raw: the papers' unnormalised terms and recipes",
    )
    style_loss: Literal["gram", "w2"] = Field(
        "gram",
        description="gram: Gram-matrix MSE (Gatys); w2: Wasserstein-2 distance between "
        "Gaussian fits of the features (slower per iteration, whatever the size)",
    )
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="adam: each scale delivers the average of its iterates with "
        "this decay (engine default 0.99; 0: the last iterate)",
    )
    lr: float | None = Field(None, gt=0, le=10)
    lbfgs_max_step: float | None = Field(
        None, gt=0, le=1, description="L-BFGS: the most any pixel moves in one step (engine default 0.25)"
    )
    init: Literal["content", "noise", "gray"] = "content"
    preserve_color: bool = False
    color: Literal["none", "luminance", "histogram"] | None = Field(
        None,
        description="none; luminance (the style's colours are not transferred, the content's "
        "are kept: same as preserve_color); histogram (styles recoloured to the content's colours)",
    )
    style_scale: float = Field(1.0, gt=0.05, le=4.0)
    style_upscale: bool = Field(False, description="resize a small style past its native size")
    exact_aspect: bool = Field(
        False,
        description="run at the content's exact aspect ratio; by default one within 3 % of a common "
        "ratio (1:1, 5:4, 4:3, 3:2, 16:9, 2:1, or their transposes) runs at that ratio, so that it "
        "can share a GPU batch, and the result is resized back to the exact aspect",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    pooling: Literal["max", "avg"] = "max"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    output_format: OutputFormat = "png"
    quality: int = Field(95, ge=1, le=100)

    @field_validator("iterations", mode="before")
    @classmethod
    def _iterations_list_bounded(cls, v: object) -> object:
        if isinstance(v, list) and len(v) > HARD_MAX_SCALES:
            raise PydanticCustomError(
                "too_many_scales", "iterations lists more than {n} scales", {"n": HARD_MAX_SCALES}
            )
        return v

    @field_validator("scales")
    @classmethod
    def _ascending(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("scales must be strictly increasing (the last one is the result's size)")
        return v

    @field_validator("min_size")
    @classmethod
    def _not_above_size(cls, v: int, info: ValidationInfo) -> int:
        """A min_size the client gave (a default is never validated here) must not exceed size."""
        size = info.data.get("size")  # absent when size itself was refused
        if isinstance(size, int) and v > size:
            raise ValueError(f"min_size {v} must not exceed size {size}")
        return v

    @field_validator("style_weights")
    @classmethod
    def _positive_blend(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and sum(v) <= 0:
            raise ValueError("style_weights must have a positive sum")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobParams:
        if self.min_size > self.size:  # the default (a given one is refused above): follow size,
            object.__setattr__(self, "min_size", self.size)  # one scale, as `stylequeue run` does
        if self.preserve_color and self.color == "histogram":
            raise ValueError('preserve_color means color "luminance"; it cannot be "histogram"')
        edges = self.long_edges()  # closed form: refuses too many scales before anything is built
        if isinstance(self.iterations, list) and len(self.iterations) != len(edges):
            raise ValueError(f"iterations lists {len(self.iterations)} values for {len(edges)} scales")
        return self

    def long_edges(self) -> list[int]:
        """The long edge of each scale (see the module-level ``long_edges``)."""
        if self.scales:
            return list(self.scales)
        return long_edges(self.size, self.min_size, self.scale_factor)

    def scale_count(self) -> int:
        return len(self.long_edges())

    def largest_size(self) -> int:
        return max(self.long_edges())

    def iterations_per_scale(self) -> list[int]:
        """Iterations at each scale; None means the engine's auto schedule (mirrored below)."""
        edges = self.long_edges()
        if self.iterations is None:
            if self.optimizer == "adam":  # crowsonkb's 1000 then 500 per scale, fewer above 512 px
                return [
                    ADAM_FIRST if i == 0 else round(ADAM_LATER * min(1.0, ADAM_EDGE / e))
                    for i, e in enumerate(edges)
                ]
            return [auto_iterations(e) for e in edges]
        if isinstance(self.iterations, int):
            return [self.iterations] * len(edges)
        return list(self.iterations)

    def total_iterations(self) -> int:
        return sum(self.iterations_per_scale())

    def work(self, regions: int = 1) -> int:
        """Sum over scales of long_edge**2 * iterations: an upper bound on pixels x iterations
        (a square image is the worst case), what a job costs a worker. The W2 style loss adds
        W2_WORK_PER_ITERATION per iteration and style region (one, or one per style when masked),
        whatever the size."""
        extra = W2_WORK_PER_ITERATION * max(1, regions) if self.style_loss == "w2" else 0
        return sum(
            (e * e + extra) * n for e, n in zip(self.long_edges(), self.iterations_per_scale(), strict=True)
        )

    def narrow_reason(
        self, contents_wh: Sequence[tuple[int, int]], styles_wh: Sequence[tuple[int, int]]
    ) -> str | None:
        """Why these images cannot run at some scale (a side under MIN_SIDE px), or None.

        The engine's rule: at each scale a content is fitted to the scale's long edge, and each
        style to ``style_scale`` x that long edge (``worker.engine``), whatever the content."""
        for edge in self.long_edges():
            style_edge = max(1, round(self.style_scale * edge))
            for role, images, long_edge in (("content", contents_wh, edge), ("style", styles_wh, style_edge)):
                for i, wh in enumerate(images):
                    w, h = fit_long_edge(wh, long_edge)
                    if min(w, h) < MIN_SIDE:
                        return (
                            f"{role} image {i} ({wh[0]}x{wh[1]}) becomes {w}x{h} px at the "
                            f"{edge} px scale; both sides must be at least {MIN_SIDE} px"
                        )
        return None


def auto_iterations(long_edge: int) -> int:
    """The engine's auto schedule, ``60 * (512 / edge) ** 1.2`` clamped to [20, 400]
    (``worker.engine.schedule.auto_iterations``; tests/engine checks they agree)."""
    growth: float = (512 / long_edge) ** 1.2  # typeshed: float ** float is Any (it may be complex)
    return max(20, min(400, round(60 * growth)))
