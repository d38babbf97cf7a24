"""What the group tests share (test_group.py, test_group_resume.py): three jobs of one shape, a run
of one of them alone, how far two results are apart, and an outcome's result."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from PIL import Image

from worker.engine import BatchItem, StyleTransfer, TransferConfig
from worker.engine.groups import GroupJob, GroupOutcome


@pytest.fixture
def jobs(
    content: Image.Image, content2: Image.Image, style: Image.Image, style2: Image.Image
) -> list[GroupJob]:
    """Three jobs of one shape: different contents, styles, blends, weights and seeds."""
    return [
        GroupJob(BatchItem(content, [style]), seed=1),
        GroupJob(BatchItem(content2, [style2], style_weight=5.0), seed=2),
        GroupJob(BatchItem(content, [style2, style], style_blend_weights=(0.3, 0.7)), seed=3),
    ]


def alone(engine: StyleTransfer, job: GroupJob, cfg: TransferConfig, **kw: Any) -> Any:
    """The job run by itself, as a worker runs a job that is not grouped."""
    return engine.run_batch([job.item], replace(cfg, seed=job.seed), **kw)


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference: a group and a run alone round differently (batched kernels), and
    with max pooling a rounding-sized change can flip a pooling window's argmax, so single pixels
    may differ more (seen: 17 of 4,608 values by up to 1e-4 on an AMD EPYC, the rest by < 3e-7)."""
    return float((a - b).abs().mean())


def ok(outcome: GroupOutcome) -> torch.Tensor:
    """The outcome's result tensor (it must have one)."""
    assert outcome.error is None and outcome.result is not None and outcome.result.tensor is not None
    return outcome.result.tensor
