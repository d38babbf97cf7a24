"""Hostile inputs fail fast: unrunnable shapes before any work, persistent NaN as "diverged"."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine import EngineError, Progress, StyleTransfer
from worker.engine import losses as losses_mod
from worker.engine import objective as objective_mod
from worker.engine.optim import Stepper
from worker.engine.schedule import MIN_SIDE, check_runnable, fit_long_edge, style_size
from worker.engine.vgg import VGGFeatures

from .conftest import small_config


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _refused(
    engine: StyleTransfer,
    content: Image.Image,
    styles: list[Image.Image],
    monkeypatch: pytest.MonkeyPatch,
    **kw: object,
) -> EngineError:
    """Run and expect EngineError with no iteration and no VGG pass at all."""
    passes: list[object] = []
    monkeypatch.setattr(VGGFeatures, "forward", lambda self, x, wanted: passes.append(x))
    seen: list[Progress] = []
    with pytest.raises(EngineError) as e:
        engine.run(content, styles, small_config(**kw), on_progress=seen.append)
    assert seen == [] and passes == []
    return e.value


def test_narrow_content_refused_before_any_iteration(
    engine: StyleTransfer,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = _refused(engine, _noise(600, 16), [style], monkeypatch, size=64, min_size=32, scales=None)
    assert err.code == "image_too_narrow"
    assert "content image becomes 32x1 px at scale 1" in err.message and "16 px" in err.message


def test_content_narrow_only_at_a_later_scale_refused_up_front(
    engine: StyleTransfer,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fine at 96 (96x19), too narrow at the explicit later scale 32 (32x6): refused before scale 1
    err = _refused(engine, _noise(200, 40), [style], monkeypatch, size=96, scales=(96, 32))
    assert err.code == "image_too_narrow" and "32x6 px at scale 2" in err.message


def test_narrow_style_refused_before_any_iteration(
    engine: StyleTransfer,
    content: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = _refused(engine, content, [content, _noise(16, 400)], monkeypatch)
    assert err.code == "image_too_narrow"
    assert "style image 2 becomes 1x32 px at scale 1" in err.message  # 16x400 fitted to 32 px


def test_small_style_scale_refused_before_any_iteration(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = _refused(engine, content, [style], monkeypatch, style_scale=0.25)  # 8 px long edge
    assert err.code == "image_too_narrow" and "style image 1 becomes 8x5 px" in err.message


def test_narrow_rule_edges() -> None:
    """The rule the API mirrors: every fitted side >= MIN_SIDE, with Python's round."""
    assert MIN_SIDE == 16
    assert fit_long_edge((16, 600), 64) == (2, 64) and fit_long_edge((600, 16), 64) == (64, 2)
    check_runnable([fit_long_edge((16, 48), 48)])  # 16x48: exactly 16 is fine
    check_runnable([fit_long_edge((16, 48), 47)])  # 15.67 rounds to 16
    with pytest.raises(EngineError) as e:
        check_runnable([fit_long_edge((16, 48), 48), fit_long_edge((16, 48), 46)])  # 15.33 -> 15
    assert e.value.code == "image_too_narrow" and "46x15" in e.value.message
    # a style fitted to style_scale x the content's long edge
    assert style_size((90, 30), (32, 48), 1.0) == (48, 16)
    check_runnable([(32, 48)], [(90, 30)], 1.0)
    with pytest.raises(EngineError):
        check_runnable([(32, 48)], [(90, 30)], 0.9)  # 43 px long edge: 43x14


def _nan_tv(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> None:
    """tv_loss is NaN at the 1-based evaluations for which bad(n) is true."""
    calls = {"n": 0}
    original = losses_mod.tv_loss  # the function objective calls (it imports the name)

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = original(x)
        return out * math.nan if bad(calls["n"]) else out

    monkeypatch.setattr(objective_mod, "tv_loss", flaky)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("limit", [0, 2, 5])
def test_persistent_nan_ends_as_diverged(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
    optimizer: str,
    limit: int,
) -> None:
    _nan_tv(monkeypatch, lambda n: True)
    seen: list[Progress] = []
    with pytest.raises(EngineError) as e:
        engine.run(
            content,
            [style],
            small_config(optimizer=optimizer, iterations=4, max_recoveries=limit),
            on_progress=seen.append,
        )
    assert e.value.code == "diverged" and "lower lr" in e.value.message
    assert len(seen) == limit  # limit recoveries reported, the next non-finite step gave up
    assert [p.recoveries for p in seen] == list(range(1, limit + 1))


def test_streak_carries_across_scales(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _nan_tv(monkeypatch, lambda n: True)
    seen: list[Progress] = []
    with pytest.raises(EngineError) as e:  # 2 iterations a scale: 3 recoveries span both scales
        engine.run(content, [style], small_config(iterations=2, max_recoveries=3), on_progress=seen.append)
    assert e.value.code == "diverged" and [p.scale for p in seen] == [0, 0, 1]


def test_a_run_with_no_finite_step_is_diverged(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _nan_tv(monkeypatch, lambda n: True)  # 2 steps in all, fewer than max_recoveries
    with pytest.raises(EngineError) as e:
        engine.run(content, [style], small_config(iterations=1))
    assert e.value.code == "diverged"


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_count_resets_after_a_good_step(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
    optimizer: str,
) -> None:
    _nan_tv(monkeypatch, lambda n: n % 2 == 0)  # every other evaluation is NaN
    seen: list[Progress] = []
    r = engine.run(
        content,
        [style],
        small_config(optimizer=optimizer, iterations=4, max_recoveries=1),
        on_progress=seen.append,
    )
    assert r.metadata["nan_recoveries"] == seen[-1].recoveries >= 3 and len(seen) == 8
    assert r.tensor is not None and torch.isfinite(r.tensor).all()


def test_adam_recovery_keeps_its_moments() -> None:
    """After a one-off NaN, Adam goes on with its moments (and a halved lr): a fresh Adam's first
    step would move every pixel by exactly +-lr."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1, 3, 8, 8, generator=g) for _ in range(12)]
    calls = {"n": 0}

    def loss_fn(x: torch.Tensor) -> torch.Tensor:  # noisy linear loss: gradient grads[n]
        calls["n"] += 1
        total = (x * grads[calls["n"]]).sum() * (math.nan if calls["n"] == 7 else 1.0)
        return torch.stack([total, total * 0, total * 0, total * 0])

    stepper = Stepper(torch.full((1, 3, 8, 8), 0.5), loss_fn, "adam", 0.01)
    for _ in range(6):
        stepper.step()
    before = stepper.x.detach().clone()
    stepper.step()  # NaN: back to the last good image, lr halved
    assert stepper.recoveries == 1 and stepper.lr == 0.005 and stepper.streak == 1
    assert not torch.equal(stepper.x, before)  # the step that led to the NaN was undone
    restored = stepper.x.detach().clone()
    stepper.step()
    assert stepper.streak == 0
    moved = (stepper.x.detach() - restored).abs() / stepper.lr
    assert moved.max() < 1.5 and moved.mean() < 0.8  # a restarted Adam: every pixel exactly 1
