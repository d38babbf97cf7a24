"""bench/gpu.py's shared part: the figures' constants, the plan and the case, and the set-up every
section uses (synthesised images, jobs, one-scale configs, device syncs and memory).

Imports only the standard library, torch, PIL, numpy and worker.engine (bench/gpu.py puts the repository
root on sys.path before it imports this module)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.engine import BatchItem, Progress, TransferConfig
from worker.engine.groups import GroupJob
from worker.engine.transfer import resolve_device, resolve_precision

GFLOP_512 = 379.0  # VGG19 to relu5_1, forward + backward to the input, one 512x512 image (the issue's)
PEAK_TFLOPS = 790.0  # H200 dense bf16: the team's figure (engine review), not measured here
DATASHEET_TFLOPS = 990.0  # the SXM datasheet's dense bf16: a higher peak only lowers the fraction
NO_READS = 10**6  # report_every that leaves only the scale-end read
STYLES = 4  # distinct style images in a group (targets cost is per distinct style)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


@dataclass(frozen=True)
class Plan:
    quick: bool
    device: str
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    optimizers: tuple[str, ...]
    counts: dict[str, tuple[int, int, int]]  # optimiser -> (report_every R, N1, N2)
    sync_counts: tuple[int, int]  # iterations of the two sync-counting runs
    sync_every: int  # their report_every when counting with host reads (the CUDA default: 10)
    budget_s: float
    graph_mode: str  # a torch.compile mode or backend (worker.engine.graph), or "off"
    graph_batches: tuple[int, ...]
    graph_reserve_s: float  # of the budget, kept from the grid for the graph cells
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def default_precision(self) -> str:
        return "bf16" if resolve_precision("auto", resolve_device(self.device)) else "fp32"


@dataclass(frozen=True)
class Case:
    optimizer: str
    precision: str
    size: int
    batch: int

    def label(self) -> str:
        return f"{self.optimizer:<5} {self.precision:<4} {self.size:>4}px B={self.batch:<3}"

    def work(self) -> int:
        return self.batch * self.size * self.size


@dataclass
class Measured:
    spi: float  # seconds per iteration (the whole batch)
    total_s: float  # the run's wall time
    n2: int
    peak_gib: float | None
    failed_items: int

    def one_time(self) -> float:
        return self.total_s - self.n2 * self.spi


# ---------------------------------------------------------------------------------------- set-up


@lru_cache(maxsize=256)
def synth_image(size: int, seed: int) -> Image.Image:
    """A seeded smooth colour field plus fine noise, size x size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    noise = rng.normal(0.0, 12.0, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_jobs(size: int, batch: int, on_progress: Callable[[Progress], Any] | None = None) -> list[GroupJob]:
    """B jobs of one shape: each its own content, STYLES styles among them."""
    return [
        GroupJob(
            BatchItem(synth_image(size, b), [synth_image(size, 10_000 + b % STYLES)]),
            seed=b,
            on_progress=on_progress,
        )
        for b in range(batch)
    ]


def one_scale(case: Case, plan: Plan, iterations: int) -> TransferConfig:
    return TransferConfig(
        size=case.size,
        min_size=case.size,
        scales=(case.size,),
        iterations=iterations,
        optimizer=case.optimizer,
        precision=case.precision,
        weights="random",
        device=plan.device,
        seed=0,
    )


def sync(plan: Plan) -> None:
    if plan.cuda():
        torch.cuda.synchronize()


def reset_memory(plan: Plan) -> None:
    gc.collect()
    if plan.cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(plan: Plan) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if plan.cuda() else None
