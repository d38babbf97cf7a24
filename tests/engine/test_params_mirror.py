"""The API's mirror of the schedule (shared.params, no torch) agrees with the engine's."""

from __future__ import annotations

import math

import pytest
from pydantic_core import PydanticCustomError

from shared import params
from shared.params import JobParams
from worker.engine import EngineError
from worker.engine.schedule import (
    MAX_SCALE_FACTOR,
    MAX_SCALES,
    MIN_SCALE_FACTOR,
    build_schedule,
    check_runnable,
    long_edges,
)


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
        {"optimizer": "adam"},  # Adam's own schedule: 1000, then 500 per scale
        {"optimizer": "adam", "size": 128},
        {"optimizer": "adam", "size": 2048},  # fewer iterations above 512 px
        {"optimizer": "adam", "iterations": 9},
    ],
)
def test_schedule_mirror(kw: dict[str, object]) -> None:
    params = JobParams(**kw)
    engine_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    schedule = build_schedule((300, 451), **engine_kw)  # type: ignore[arg-type]
    assert [max(hw) for hw, _ in schedule] == params.long_edges()
    assert [n for _, n in schedule] == params.iterations_per_scale()


FACTORS = [
    1 + 2**-52,
    1.000001,
    1.05,
    1.0999,
    1.1,
    1.25,
    2**0.5,
    2.0,
    3.999,
    4.0,
    4.0001,
    4.5,
    0.5,
    math.nan,
    math.inf,
]


def _engine_edges(size: int, min_size: int, factor: float) -> list[int] | str:
    try:
        return long_edges(size, min_size, factor, MAX_SCALES)
    except EngineError as e:
        return {"invalid_config": "scale_factor_range"}.get(e.code, e.code)


def _api_edges(size: int, min_size: int, factor: float) -> list[int] | str:
    try:
        return params.long_edges(size, min_size, factor, MAX_SCALES)
    except PydanticCustomError as e:
        return e.type


@pytest.mark.parametrize("factor", FACTORS)
def test_long_edges_mirror_hostile(factor: float) -> None:
    """Same edges, or the same refusal, for hostile factors and sizes (16 scales at most)."""
    assert (params.MIN_SCALE_FACTOR, params.MAX_SCALE_FACTOR) == (MIN_SCALE_FACTOR, MAX_SCALE_FACTOR)
    outcomes = set()
    for size in (16, 17, 64, 130, 147, 512, 768, 2048, 65_536):
        for min_size in (16, 32, 128, 512):
            got = _engine_edges(size, min_size, factor)
            assert got == _api_edges(size, min_size, factor), (size, min_size, factor)
            outcomes.add(got if isinstance(got, str) else "edges")
    assert outcomes - {"edges"} <= {"scale_factor_range", "too_many_scales"}
    assert "edges" in outcomes  # min_size >= size is one scale, whatever the factor


@pytest.mark.parametrize("style_scale", [1.0, 0.9, 0.25])
@pytest.mark.parametrize(
    "kw", [{"size": 64, "min_size": 32}, {"size": 96, "min_size": 32, "scales": [32, 96]}, {}]
)
def test_narrow_rule_mirror(kw: dict[str, object], style_scale: float) -> None:
    """The engine refuses (image_too_narrow) exactly the images the API's mirror refuses."""
    job = JobParams(style_scale=style_scale, **kw)
    engine_kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    outcomes = set()
    for cw, ch in ((600, 16), (200, 40), (96, 64), (16, 400), (48, 16), (47, 16), (46, 16)):
        for style_wh in ((96, 65), (16, 400), (30, 90), (46, 16)):
            try:
                sched = build_schedule((ch, cw), **engine_kw)  # type: ignore[arg-type]
                check_runnable([hw for hw, _ in sched], [style_wh[::-1]], style_scale)
                engine_ok = True
            except EngineError as e:
                assert e.code == "image_too_narrow"
                engine_ok = False
            api_ok = job.narrow_reason([(cw, ch)], [style_wh]) is None
            assert engine_ok == api_ok, (kw, style_scale, (cw, ch), style_wh)
            outcomes.add(engine_ok)
    assert False in outcomes and (True in outcomes or style_scale == 0.25)  # 0.25: under 16 px when small
