"""Hostile settings are refused at once with a stable code: scale factors, scale counts, weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from PIL import Image

from worker.engine import BatchItem, EngineError, StyleTransfer, TransferConfig
from worker.engine.checks import normalise_blend
from worker.engine.schedule import MAX_SCALES, build_schedule, long_edges

from .conftest import small_config

HOSTILE_FACTORS = [1 + 2**-52, 1.000001, 1.05, 1.0999, 4.0001, 4.5, 1.0, 0.5, -2.0, math.nan, math.inf]


def _code(fn: Callable[..., object], *args: object, **kw: object) -> str:
    with pytest.raises(EngineError) as e:
        fn(*args, **kw)
    return e.value.code


@pytest.mark.parametrize("factor", HOSTILE_FACTORS)
def test_hostile_scale_factor_refused(factor: float) -> None:
    # 1 + 2**-52 used to loop ~1e16 times: returning at all shows the loop is bounded
    assert _code(long_edges, 512, 128, factor) == "invalid_config"
    assert _code(TransferConfig, scale_factor=factor) == "invalid_config"
    assert _code(build_schedule, (64, 96), size=512, min_size=16, scale_factor=factor) == "invalid_config"


@pytest.mark.parametrize("factor", [1.1, 2**0.5, 4.0])
def test_scale_factor_bounds_accepted(factor: float) -> None:
    edges = long_edges(512, 128, factor)
    assert edges[0] == 128 and edges[-1] == 512 and edges == sorted(set(edges))
    assert TransferConfig(scale_factor=factor).scale_factor == factor


def test_too_many_scales() -> None:
    # min 32 by 1.1: 130 px is exactly 16 scales, 147 px would be 17 (no near-duplicate to drop)
    sixteen = long_edges(130, 32, 1.1)
    assert len(sixteen) == MAX_SCALES == 16 and sixteen[0] == 32 and sixteen[-1] == 130
    assert TransferConfig(size=130, min_size=32, scale_factor=1.1).max_scales == 16
    assert _code(long_edges, 147, 32, 1.1) == "too_many_scales"  # caught after the loop
    assert len(long_edges(147, 32, 1.1, max_scales=17)) == 17
    assert _code(TransferConfig, size=147, min_size=32, scale_factor=1.1) == "too_many_scales"
    assert TransferConfig(size=147, min_size=32, scale_factor=1.1, max_scales=17).max_scales == 17
    with pytest.raises(EngineError) as e:  # caught by the closed form, before the loop
        long_edges(10**9, 16, 1.1)
    assert e.value.code == "too_many_scales"
    assert "maximum is 16" in e.value.message and "raise scale_factor or min_size" in e.value.message
    assert _code(build_schedule, (64, 96), size=4096, min_size=16, scale_factor=1.1) == "too_many_scales"
    assert (
        _code(build_schedule, (64, 96), size=130, min_size=32, scale_factor=1.1, max_scales=15)
        == "too_many_scales"
    )


def test_explicit_scales_limit() -> None:
    sixteen = tuple(range(32, 64, 2))
    assert len(build_schedule((64, 96), scales=sixteen, iterations=1)) == 16
    assert TransferConfig(scales=sixteen).scales == sixteen
    seventeen = (*sixteen, 64)
    assert _code(build_schedule, (64, 96), scales=seventeen) == "too_many_scales"
    assert _code(TransferConfig, scales=seventeen) == "too_many_scales"
    assert TransferConfig(scales=seventeen, max_scales=17).scales == seventeen
    assert _code(TransferConfig, max_scales=0) == "invalid_config"


def test_sixteen_scales_run(engine: StyleTransfer, content: Image.Image, style: Image.Image) -> None:
    scales = tuple(range(24, 56, 2))  # 96x64 content: 24 px long edge is 16 px short side
    steps: list[int] = []
    r = engine.run(
        content,
        [style],
        small_config(size=54, scales=scales, iterations=1),
        on_progress=lambda p: steps.append(p.step),
    )
    assert steps == list(range(1, 17)) and r.image.size == (54, 36)


BAD = [math.nan, math.inf, -math.inf, -1.0, -1e-9]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("field", ["content_weight", "style_weight", "tv_weight"])
def test_non_finite_or_negative_loss_weights_refused(field: str, bad: float) -> None:
    assert _code(TransferConfig, **{field: bad}) == "invalid_config"
    assert _code(BatchItem, "c", ["s"], **{field: bad}) == "invalid_config"
    assert getattr(TransferConfig(**{field: 0.0}), field) == 0.0  # type: ignore[arg-type]  # 0 is off


@pytest.mark.parametrize("bad", BAD)
def test_non_finite_layer_and_blend_weights_refused(bad: float) -> None:
    layers = ("relu1_1", "relu2_1")
    assert _code(TransferConfig, style_layers=layers, style_layer_weights=(1.0, bad)) == "invalid_config"
    assert _code(TransferConfig, style_blend_weights=(bad, 1.0)) == "invalid_config"
    assert _code(BatchItem, "c", ["s", "t"], (1.0, bad)) == "invalid_config"
    assert _code(normalise_blend, (1.0, bad), 2) == "invalid_config"


@pytest.mark.parametrize("blend", [(0.0, 0.0), (1e308, 1e308), ()])
def test_blend_sum_must_be_positive_and_finite(blend: tuple[float, ...]) -> None:
    assert _code(TransferConfig, style_blend_weights=blend) == "invalid_config"
    assert _code(normalise_blend, blend, len(blend) or 1) == "invalid_config"


def test_blend_normalises() -> None:
    assert normalise_blend((1.0, 3.0), 2) == [0.25, 0.75]
    assert normalise_blend(None, 4) == [0.25] * 4
    assert _code(normalise_blend, (1.0, 3.0), 3) == "invalid_config"


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": math.nan},
        {"lr": math.inf},
        {"lr": 0.0},
        {"lr": -0.1},
        {"style_scale": math.nan},
        {"style_scale": math.inf},
        {"style_scale": 0.0},
        {"style_scale": -1.0},
        {"betas": (math.nan, 0.99)},
        {"betas": (0.9, math.inf)},
        {"betas": (0.9, 1.0)},
        {"betas": (-0.1, 0.99)},
        {"betas": (0.9,)},
        {"max_recoveries": -1},
    ],
)
def test_bad_numbers_refused(kw: dict[str, object]) -> None:
    assert _code(TransferConfig, **kw) == "invalid_config"


def test_good_numbers_accepted() -> None:
    cfg = TransferConfig(lr=0.5, style_scale=0.5, betas=(0.0, 0.999), max_recoveries=0, tv_weight=1)
    assert cfg.betas == (0.0, 0.999) and cfg.resolved_lr() == 0.5


def test_mutated_batch_item_refused_at_run(
    engine: StyleTransfer, content: Image.Image, style: Image.Image
) -> None:
    item = BatchItem(content, [style], style_weight=1.0)
    item.style_weight = math.nan  # a BatchItem is mutable: the run checks again
    assert _code(engine.run_batch, [item], small_config()) == "invalid_config"


def test_limits_do_not_change_the_digest() -> None:
    # checkpoints made before max_scales/max_recoveries existed still resume
    assert TransferConfig().digest() == TransferConfig(max_scales=20, max_recoveries=1).digest()
    assert TransferConfig().digest() != TransferConfig(seed=1).digest()
