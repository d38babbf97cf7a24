"""Gram, losses, layer names and the schedule against their formulas."""

from __future__ import annotations

import pytest
import torch
import torchvision

from worker.engine import EngineError
from worker.engine.losses import content_loss, gram, style_layer_loss, tv_loss
from worker.engine.schedule import auto_iterations, build_schedule, long_edges
from worker.engine.vgg import LAYER_INDEX, VGGFeatures, build_features, random_init_


def test_gram_matches_formula() -> None:
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    g = gram(f)
    flat = f[1].reshape(3, 4)
    assert g.shape == (2, 3, 3)
    assert torch.allclose(g[1], flat @ flat.T / (3 * 2 * 2))
    assert gram(f.to(torch.bfloat16)).dtype == torch.float32  # always fp32


@pytest.mark.parametrize("batch", [1, 2])
def test_gram_gradient(batch: int) -> None:
    f = torch.randn(batch, 3, 4, 5, requires_grad=True)
    g = torch.randn(batch, 3, 3)
    (gram(f) * g).sum().backward()
    flat = f.detach().reshape(batch, 3, 20).clone().requires_grad_(True)
    (torch.bmm(flat, flat.transpose(1, 2)) / 60 * g).sum().backward()
    assert f.grad is not None and flat.grad is not None
    assert torch.allclose(f.grad.reshape(batch, 3, 20), flat.grad, atol=1e-6)


def test_content_style_tv_losses() -> None:
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    b[1] *= 3
    assert content_loss(a, b).tolist() == [1.0, 9.0]
    assert style_layer_loss(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)).tolist() == [4.0]
    x = torch.zeros(1, 1, 2, 3)
    x[..., :, 1] = 1.0  # columns 0,1,0: every horizontal difference is 1, vertical 0
    assert tv_loss(x).tolist() == [1.0]
    assert tv_loss(torch.ones(2, 3, 4, 4)).tolist() == [0.0, 0.0]


def test_layer_names_match_torchvision() -> None:
    tv = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
    ours = build_features()
    assert [type(m) for m in ours] == [type(m) for m in tv]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in tv.state_dict().items()
    }
    assert LAYER_INDEX["conv4_2"] == 21 and LAYER_INDEX["relu4_2"] == 22
    assert LAYER_INDEX["relu5_1"] == 29 and LAYER_INDEX["pool5"] == 36


def test_conv_and_relu_names_mean_what_they_say() -> None:
    features = build_features()
    random_init_(features, 0)
    model = VGGFeatures(features, LAYER_INDEX["relu4_2"], "imagenet")
    x = torch.rand(1, 3, 32, 32)
    conv, relu = LAYER_INDEX["conv4_2"], LAYER_INDEX["relu4_2"]
    both = model(x, frozenset({conv, relu}))
    only_conv = model(x, frozenset({conv}))[conv]
    assert only_conv.min() < 0  # the pre-ReLU output was not overwritten by an in-place ReLU
    assert torch.equal(both[conv], only_conv)
    assert both[relu].min() >= 0
    assert torch.equal(both[relu], only_conv.clamp(min=0))


def test_schedule_is_plain_data() -> None:
    assert long_edges(512, 128, 2**0.5) == [128, 181, 256, 362, 512]
    sched = build_schedule((300, 451), size=512)
    assert sched == [
        ((85, 128), 317),
        ((120, 181), 209),
        ((170, 256), 138),
        ((241, 362), 91),
        ((341, 512), 60),
    ]
    assert build_schedule((100, 50), scales=(64, 96), iterations=(5, 3)) == [((64, 32), 5), ((96, 48), 3)]
    assert build_schedule((64, 64), size=64, min_size=128, iterations=7) == [((64, 64), 7)]
    assert [n for _, n in build_schedule((10, 10), size=512, min_size=128)] == [
        auto_iterations(e) for e in (128, 181, 256, 362, 512)
    ]
    with pytest.raises(EngineError):
        build_schedule((64, 64), scales=(32, 64), iterations=(1, 2, 3))
