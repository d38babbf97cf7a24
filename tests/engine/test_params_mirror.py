"""The API's mirror of the schedule (shared.params, no torch) agrees with the engine's."""

from __future__ import annotations

import pytest

from shared.params import JobParams
from worker.engine.schedule import build_schedule


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"size": 2048},
        {"size": 768},  # 724 would be a near-duplicate of 768: dropped
        {"size": 700, "min_size": 128},
        {"size": 130, "min_size": 128},
        {"size": 1000, "min_size": 100, "scale_factor": 1.5},
        {"size": 96, "min_size": 32, "scale_factor": 2.0},
        {"size": 128, "min_size": 128},
        {"size": 300, "min_size": 64, "iterations": 7},
        {"scales": [64, 100, 333], "size": 333},
    ],
)
def test_schedule_mirror(kw: dict[str, object]) -> None:
    params = JobParams(**kw)  # type: ignore[arg-type]
    engine_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    schedule = build_schedule((300, 451), **engine_kw)  # type: ignore[arg-type]
    assert [max(hw) for hw, _ in schedule] == params.long_edges()
    assert [n for _, n in schedule] == params.iterations_per_scale()
