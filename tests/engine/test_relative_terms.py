"""Relative loss terms (each divided by its target's energy) and the defaults defined on them."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from worker.engine import StyleTransfer, TransferConfig
from worker.engine.config import RAW_PRESETS, RELATIVE_PRESET
from worker.engine.objective import LossFn
from worker.engine.targets import StyleSpec, compute_targets
from worker.engine.vgg import LAYER_INDEX, VGGFeatures, build_features, random_init_

CONTENT, STYLES = ["relu4_2"], ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]


def _model(k: float) -> VGGFeatures:
    """Random VGG19 with zero biases and the first conv's weights times k: ReLU and max pooling
    are positively homogeneous, so every feature map is exactly k times the k = 1 model's (as if
    a weights family had k times larger activations)."""
    features = build_features()
    random_init_(features, 0)
    with torch.no_grad():
        for m in features.modules():
            if isinstance(m, torch.nn.Conv2d):
                assert m.bias is not None  # VGG19's convolutions have biases
                m.bias.zero_()
        first = features[0]
        assert isinstance(first, torch.nn.Conv2d)
        first.weight.mul_(k)
    return VGGFeatures(features, LAYER_INDEX["relu4_2"], "imagenet")


def _terms(k: float, relative: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 48, 48, generator=g), torch.rand(1, 3, 48, 48, generator=g)
    model = _model(k)
    c_idx, s_idx = [LAYER_INDEX[n] for n in CONTENT], [LAYER_INDEX[n] for n in STYLES]
    targets = compute_targets(
        model,
        content,
        [[(style, 1.0)]],
        c_idx,
        s_idx,
        torch.tensor([[1.0, 1.0, 1.0]]),
        contextlib.nullcontext,
        spec=StyleSpec("gram", relative),
    )
    fn = LossFn(model, targets, dict.fromkeys(s_idx, 1.0), contextlib.nullcontext)
    x = (content * 0.7 + style * 0.3).requires_grad_(True)  # somewhere between the two
    return fn(x)[2:4].detach()  # content, style


def test_relative_terms_do_not_depend_on_the_features_magnitude() -> None:
    """Features x10 (another weights family, another pooling): raw content x100, raw Gram MSE x1e4;
    relative terms unchanged, so one preset serves every family."""
    raw1, raw10 = _terms(1.0, relative=False), _terms(10.0, relative=False)
    assert raw10[0] / raw1[0] == pytest.approx(1e2, rel=1e-3)
    assert raw10[1] / raw1[1] == pytest.approx(1e4, rel=1e-3)
    rel1, rel10 = _terms(1.0, relative=True), _terms(10.0, relative=True)
    assert rel10 == pytest.approx(rel1, rel=1e-4)
    assert 1e-3 < rel1[0] < 10 and 1e-3 < rel1[1] < 40  # O(0.01-1) each: comparable terms


def test_relative_default_preset_and_layer_weights() -> None:
    cfg = TransferConfig()
    assert cfg.loss_terms == "relative"
    for family in ("torchvision", "caffe", "random"):  # one preset for all
        assert cfg.loss_weights(family) == RELATIVE_PRESET
    assert cfg.layer_weights() == pytest.approx([w / 341 for w in (256, 64, 16, 4, 1)])  # crowsonkb
    three = TransferConfig(style_layers=("relu1_1", "relu2_1", "relu3_1"))
    assert three.layer_weights() == pytest.approx([16 / 21, 4 / 21, 1 / 21])
    raw = TransferConfig(loss_terms="raw")
    assert raw.loss_weights("caffe") == RAW_PRESETS["caffe"] and raw.layer_weights() == (1.0,) * 5
    assert TransferConfig(style_layer_weights=(1, 2, 3, 4, 5)).layer_weights() == (1, 2, 3, 4, 5)
    assert TransferConfig().digest() != raw.digest()  # a different job: checkpoints do not mix


def test_relative_and_raw_runs_both_remove_the_style_term(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    from .conftest import small_config

    for terms in ("relative", "raw"):
        r = engine.run(content, [style], small_config(loss_terms=terms, iterations=6))
        removed = r.metadata["loss_removed"]
        assert all(s["style"] is not None and s["style"] > 0.1 for s in removed), (terms, removed)
