"""The engine controls a job may set (the ``params`` of ``POST /v1/jobs``), validated once here.

The API validates with this model (it never imports torch); the worker turns the stored dump into the
engine's ``TransferConfig``. Unknown keys are rejected, so a typo is a 422, not a silent default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OutputFormat = Literal["png", "jpeg", "webp"]


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=16, description="long edge of the result in pixels")
    min_size: int = Field(128, ge=16, description="long edge of the first (coarsest) scale")
    scale_factor: float = Field(2**0.5, gt=1.0, le=4.0)
    scales: list[int] | None = Field(None, min_length=1, max_length=16)
    iterations: int | list[int] | None = Field(
        None, description="per scale: one value for every scale, a list, or null for the default"
    )
    style_weights: list[float] | None = Field(None, description="blend weights, one per style")
    content_weight: float | None = Field(None, ge=0)
    style_weight: float | None = Field(None, ge=0)
    tv_weight: float | None = Field(None, ge=0)
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float | None = Field(None, gt=0, le=10)
    init: Literal["content", "noise", "gray"] = "content"
    preserve_color: bool = False
    style_scale: float = Field(1.0, gt=0.05, le=4.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    pooling: Literal["max", "avg"] = "max"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    output_format: OutputFormat = "png"
    quality: int = Field(95, ge=1, le=100)

    @field_validator("iterations")
    @classmethod
    def _positive_iterations(cls, v: int | list[int] | None) -> int | list[int] | None:
        values = [v] if isinstance(v, int) else (v or [])
        if any(n < 1 or n > 100_000 for n in values):
            raise ValueError("iterations must be between 1 and 100000")
        return v

    @field_validator("scales")
    @classmethod
    def _scales_in_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 16 for s in v):
            raise ValueError("every scale must be at least 16 px")
        return v

    @field_validator("style_weights")
    @classmethod
    def _nonnegative_blend(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("style_weights must be non-negative with a positive sum")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobParams:
        if self.min_size > self.size:
            raise ValueError("min_size must not exceed size")
        if isinstance(self.iterations, list) and len(self.iterations) != self.scale_count():
            raise ValueError(
                f"iterations lists {len(self.iterations)} values for {self.scale_count()} scales"
            )
        return self

    def long_edges(self) -> list[int]:
        """The long edge of each scale: the same rule as ``worker.engine.schedule.long_edges``
        (mirrored because the API never imports the engine; tests/engine checks they agree)."""
        if self.scales:
            return list(self.scales)
        if self.min_size >= self.size:
            return [self.size]
        edges: list[int] = []
        edge = float(self.min_size)
        while edge < self.size * (1 - 1e-6):
            edges.append(round(edge))
            edge *= self.scale_factor
        if edges and self.size / edges[-1] < self.scale_factor**0.5:
            edges.pop()  # no near-duplicate last scale
        return [*edges, self.size]

    def scale_count(self) -> int:
        return len(self.long_edges())

    def largest_size(self) -> int:
        return max(self.long_edges())

    def iterations_per_scale(self) -> list[int]:
        """Iterations at each scale; None means the engine's auto schedule (mirrored below)."""
        edges = self.long_edges()
        if self.iterations is None:
            return [auto_iterations(e) for e in edges]
        if isinstance(self.iterations, int):
            return [self.iterations] * len(edges)
        return list(self.iterations)

    def total_iterations(self) -> int:
        return sum(self.iterations_per_scale())


def auto_iterations(long_edge: int) -> int:
    """The engine's auto schedule, ``60 * (512 / edge) ** 1.2`` clamped to [20, 400]
    (``worker.engine.schedule.auto_iterations``; tests/engine checks they agree)."""
    return max(20, min(400, round(60 * (512 / long_edge) ** 1.2)))
