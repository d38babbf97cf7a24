"""Average pooling is rescaled so the style and content terms keep max pooling's magnitudes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from worker.engine import StyleTransfer
from worker.engine.images import pil_to_tensor, resize
from worker.engine.losses import content_loss, gram, style_layer_loss
from worker.engine.vgg import AVG_POOL_SCALE, LAYER_INDEX, VGGFeatures, build_features

STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def _terms(model: VGGFeatures, content: torch.Tensor, style: torch.Tensor) -> dict[str, float]:
    """The raw terms at a content image: each style layer's loss against the style, and the content
    loss of the style image (what a fully stylised result would pay)."""
    wanted = frozenset(LAYER_INDEX[n] for n in (*STYLE, "relu4_2"))
    with torch.no_grad():
        fc, fs = model(content, wanted), model(style, wanted)
    out = {n: float(style_layer_loss(gram(fc[LAYER_INDEX[n]]), gram(fs[LAYER_INDEX[n]]))) for n in STYLE}
    out["content"] = float(content_loss(fs[LAYER_INDEX["relu4_2"]], fc[LAYER_INDEX["relu4_2"]]))
    return out


@pytest.mark.parametrize("pair", [("content", "style"), ("content2", "style2")])
def test_avg_pooling_keeps_the_terms_magnitudes(
    engine: StyleTransfer, request: pytest.FixtureRequest, pair: tuple[str, str]
) -> None:
    content_im: Image.Image = request.getfixturevalue(pair[0])
    c = pil_to_tensor(content_im)
    s = resize(pil_to_tensor(request.getfixturevalue(pair[1])), (c.shape[-2], c.shape[-1]))
    deepest = LAYER_INDEX["relu5_1"]
    cpu = torch.device("cpu")
    base = _terms(engine.model("random", cpu, "max", deepest), c, s)
    avg = _terms(engine.model("random", cpu, "avg", deepest), c, s)
    ratios = {n: avg[n] / base[n] for n in base}
    assert all(1 / 3 < r < 3 for r in ratios.values()), ratios
    unscaled = build_features("avg")  # the plain AvgPool2d of before
    unscaled.load_state_dict(engine.load_weights("random").state)
    plain = _terms(VGGFeatures(unscaled, deepest, "imagenet"), c, s)
    assert plain["relu5_1"] / base["relu5_1"] < 0.1  # what the scale is for
    assert plain["content"] / base["content"] < 1 / 3
    assert AVG_POOL_SCALE["torchvision"] == 2.0  # crowsonkb's, for trained weights
