"""The objective is normalised per scale (L-BFGS must not stall on small weights) and progress is
reported per term; L-BFGS steps are capped so one bad curvature pair cannot blow the image up."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
from PIL import Image

from worker.engine import Progress, StyleTransfer, TransferConfig
from worker.engine import losses as losses_mod
from worker.engine import objective as objective_mod
from worker.engine.objective import LossFn
from worker.engine.optim import Stepper
from worker.engine.targets import Region, Targets
from worker.engine.vgg import LAYER_INDEX, VGGFeatures, build_features, random_init_

from .conftest import small_config


def _run(
    engine: StyleTransfer, content: Image.Image, style: Image.Image, cfg: TransferConfig
) -> tuple[list[Progress], dict[str, Any]]:
    seen: list[Progress] = []
    r = engine.run(content, [style], cfg, on_progress=seen.append)
    return seen, r.metadata


def test_progress_does_not_depend_on_the_weights_scale(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    """All weights x k: the same problem. Before the normalisation L-BFGS kept no curvature pair
    below k ~ 1e-2 and the loss did not move (the job still "succeeded")."""
    removed = {}
    for k in (1e-6, 1e-3, 1.0, 1e3):
        cfg = small_config(iterations=8, content_weight=k, style_weight=1e6 * k, tv_weight=1e-2 * k)
        _, meta = _run(engine, content, style, cfg)
        removed[k] = [scale["loss"] for scale in meta["loss_removed"]]
    assert min(removed[1.0]) > 0.5, removed
    for k, fractions in removed.items():
        assert fractions == pytest.approx(removed[1.0], abs=0.05), (k, removed)


def test_default_weights_loss_falls_at_every_scale(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    """The preset's weights, three scales: before, L-BFGS removed 4-8 % per scale here."""
    seen, meta = _run(engine, content, style, small_config(size=64, scales=(32, 48, 64), iterations=10))
    assert [round(s["loss"], 3) for s in meta["loss_removed"]] == [
        round(p.loss_removed, 3)  # type: ignore[arg-type]
        for p in seen
        if p.iteration == p.iterations
    ]
    for s in range(3):
        here = [p for p in seen if p.scale == s]
        first, last = here[0], here[-1]
        assert last.loss_removed == pytest.approx(1 - last.loss / first.loss)
        assert last.loss_removed is not None and last.loss_removed > 0.1, meta["loss_removed"]
        assert last.style_removed is not None and last.style_removed > 0.1
    assert seen[0].content_removed is None  # a content init starts at content loss 0
    assert seen[0].tv_removed == pytest.approx(0.0, abs=1e-6)  # a small tv term, at its start
    assert meta["loss_removed"][1]["content"] is not None


def _loss_fn(x: torch.Tensor, weights: torch.Tensor) -> LossFn:
    features = build_features()
    random_init_(features, 0)
    relu1, relu2 = LAYER_INDEX["relu1_1"], LAYER_INDEX["relu2_1"]
    model = VGGFeatures(features, relu2, "imagenet")
    with torch.no_grad():
        feats = model(
            torch.rand(x.shape, generator=torch.Generator().manual_seed(1)), frozenset({relu1, relu2})
        )
    b = x.shape[0]
    region = Region(None, torch.ones(b), {relu1: losses_mod.gram(feats[relu1])}, {relu1: torch.ones(b)})
    targets = Targets({relu2: feats[relu2]}, [region], weights)
    return LossFn(model, targets, {relu1: 1.0}, contextlib.nullcontext)


def test_objective_is_each_items_total_over_its_start() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([[1.0, 1e6, 1.0], [1e-6, 1.0, 0.0]])  # (B, 3) per item
    fn = _loss_fn(x, weights)
    first = fn(x)
    assert first[0].item() == pytest.approx(2.0)  # 1 per item at the start
    assert first[1].item() == pytest.approx(first[2:].sum().item())  # raw weighted total
    start = fn.start
    later = fn(x * 0.5)
    assert fn.start is start and start is not None and not start.requires_grad  # kept, detached
    assert later[0].item() != pytest.approx(2.0)
    scaled = _loss_fn(x, weights * 1e-3)
    assert scaled(x)[0].item() == pytest.approx(2.0)
    assert scaled(x * 0.5)[0].item() == pytest.approx(later[0].item(), rel=1e-4)  # scale-free
    zero = _loss_fn(x, torch.zeros(2, 3))
    assert zero(x)[0].item() == 0.0 and zero(x * 0.5)[0].item() == 0.0  # nothing to remove: no 0/0


def test_non_finite_first_evaluation_does_not_poison_the_divisor(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = {"n": 0}
    original = losses_mod.tv_loss  # the function objective calls (it imports the name)

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return original(x) * (math.nan if calls["n"] == 1 else 1.0)

    monkeypatch.setattr(objective_mod, "tv_loss", flaky)
    seen, meta = _run(engine, content, style, small_config(iterations=6, tv_weight=1e-2))
    assert meta["nan_recoveries"] == 1
    assert all(math.isfinite(p.loss) for p in seen[1:])
    assert meta["loss_removed"][0]["loss"] > 0.1  # the divisor was taken at the next evaluation


def test_lbfgs_step_is_capped(engine: StyleTransfer, content: Image.Image, style: Image.Image) -> None:
    """Uncapped, one ill-conditioned curvature pair here moves pixels by ~30 and the loss jumps
    ~77x; with the cap every step moves no pixel by more than lbfgs_max_step."""
    cfg = small_config(scales=(48,), iterations=12)
    uncapped, _ = _run(engine, content, style, small_config(scales=(48,), iterations=12, lbfgs_max_step=1e9))
    assert max(p.loss for p in uncapped) > 10 * uncapped[0].loss  # what the cap is for
    capped, _ = _run(engine, content, style, cfg)
    assert max(p.loss for p in capped) <= capped[0].loss
    assert capped[-1].loss < 0.5 * capped[0].loss


def test_cap_bounds_every_pixel_move() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 8, 8, generator=g)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:  # a quadratic with a steep valley
        total = ((x - target).pow(2) * torch.linspace(1, 1e4, 192).view_as(x)).sum()
        return torch.stack([total, total, total * 0, total * 0, total * 0])

    stepper = Stepper(torch.full((1, 3, 8, 8), 0.5), loss_fn, "lbfgs", 1.0, max_step=0.01)
    for _ in range(20):
        before = stepper.x.detach().clone()
        stepper.step()
        assert (stepper.x.detach() - before).abs().max() <= 0.01 + 1e-7
    with pytest.raises(Exception) as e:
        TransferConfig(lbfgs_max_step=0.0)
    assert getattr(e.value, "code", None) == "invalid_config"
