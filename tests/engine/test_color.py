"""Colour control: luminance-only transfer delivers what it optimised; histogram matching."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from worker.engine import Checkpoint, EngineError, StyleTransfer, TransferConfig
from worker.engine import pyramid as job_mod
from worker.engine.color import match_color, rgb_to_yiq
from worker.engine.images import pil_to_tensor, resize
from worker.engine.items import prepare_item
from worker.engine.objective import LossFn
from worker.engine.vgg import VGGFeatures

from .conftest import small_config


def test_luminance_mode_delivers_what_it_optimised(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the iterate kept three free channels: the optimiser put colour in it, the VGG saw
    that colour, and the delivered image (its luminance with the content's chroma) scored 3.3x the
    loss of what was optimised; the previews showed the colour iterate."""
    fed: list[torch.Tensor] = []
    original = VGGFeatures.forward

    def spy(self: VGGFeatures, x: torch.Tensor, wanted: frozenset[int]) -> dict[int, torch.Tensor]:
        if x.requires_grad:  # an evaluation of the iterate, not a target pass
            fed.append(x.detach().clone())
        return original(self, x, wanted)

    fns: list[LossFn] = []

    class Recorded(LossFn):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            fns.append(self)

    monkeypatch.setattr(VGGFeatures, "forward", spy)
    monkeypatch.setattr(job_mod, "LossFn", Recorded)
    cfg = small_config(preserve_color=True, optimizer="adam", lr=0.05, iterations=10)
    saved: list[Checkpoint] = []
    r = engine.run(content, [style], cfg, on_checkpoint=saved.append)
    assert r.tensor is not None and fed
    assert all(torch.equal(f[:, 0], f[:, 1]) and torch.equal(f[:, 1], f[:, 2]) for f in fed)  # grey
    last = saved[-1]
    assert last.end_of_scale and last.luminance is not None and last.luminance.shape == (1, 1, 32, 48)
    assert torch.equal(last.image, r.tensor)  # the preview is the delivered image
    delivered_y = rgb_to_yiq(r.tensor)[:, :1]
    assert (delivered_y - last.luminance).abs().mean() < 0.005  # only the RGB clamp moves it
    with torch.no_grad():
        optimised, delivered = fns[-1](last.luminance)[1], fns[-1](delivered_y)[1]
    assert delivered.item() == pytest.approx(optimised.item(), rel=0.05)
    ref = resize(pil_to_tensor(content), (32, 48))
    assert (rgb_to_yiq(r.tensor)[:, 1:] - rgb_to_yiq(ref)[:, 1:]).abs().mean() < 0.01  # its chroma


def test_luminance_mode_resumes_bit_identically(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    cfg = small_config(color="luminance", iterations=4, save_every=2)
    saved: list[bytes] = []
    r = engine.run(content, [style], cfg, on_checkpoint=lambda c: saved.append(c.to_bytes()))
    mid = Checkpoint.from_bytes(saved[2])  # scale 1, iteration 2
    assert (mid.scale, mid.iteration) == (1, 2) and mid.luminance is not None
    resumed = engine.run(content, [style], cfg, resume=mid)
    assert resumed.tensor is not None and r.tensor is not None
    assert torch.equal(resumed.tensor, r.tensor)
    mid.luminance = None  # a checkpoint of another colour mode
    with pytest.raises(EngineError) as e:
        engine.run(content, [style], cfg, resume=mid)
    assert e.value.code == "checkpoint_mismatch"


def test_color_option_and_preserve_color_are_one_setting() -> None:
    assert TransferConfig(preserve_color=True).color == "luminance"
    assert TransferConfig(color="luminance").preserve_color is True
    assert TransferConfig(color="luminance").digest() == TransferConfig(preserve_color=True).digest()
    assert TransferConfig().color == "none" and TransferConfig().preserve_color is False
    for bad in ({"color": "sepia"}, {"color": "histogram", "preserve_color": True}):
        with pytest.raises(EngineError) as e:
            TransferConfig(**bad)
        assert e.value.code == "invalid_config"


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x[0].double().flatten(1)
    return flat.mean(dim=1), torch.cov(flat)


def test_histogram_matching_gives_each_style_the_contents_colours(
    content: Image.Image,
    style: Image.Image,
    style2: Image.Image,
) -> None:
    c = pil_to_tensor(content)
    mu_c, cov_c = _moments(c)
    for s in (pil_to_tensor(style), pil_to_tensor(style2)):
        mu_s, cov_s = _moments(s)
        assert (mu_s - mu_c).abs().max() > 0.05  # they did differ
        mu, cov = _moments(match_color(s, c))
        assert (mu - mu_c).abs().max() < 0.02  # the [0, 1] clamp moves it a little
        assert (cov - cov_c).abs().max() < 0.1 * cov_c.abs().max()
    flat = torch.full((1, 3, 16, 16), 0.3)  # a singular covariance: no NaN
    assert torch.isfinite(match_color(flat, c)).all()
    item = prepare_item(c, [pil_to_tensor(style)], [1.0], (1.0, 1.0, 0.0), "histogram")
    assert torch.equal(item.content, c) and torch.equal(item.styles[0], match_color(pil_to_tensor(style), c))


def test_histogram_run_is_in_colour(engine: StyleTransfer, content: Image.Image, style: Image.Image) -> None:
    r = engine.run(content, [style], small_config(color="histogram", iterations=3))
    assert r.tensor is not None and r.tensor.shape == (1, 3, 32, 48)
    assert (r.tensor[:, 0] - r.tensor[:, 2]).abs().mean() > 0.01  # not grey
    plain = engine.run(content, [style], small_config(iterations=3))
    assert plain.tensor is not None and not torch.equal(plain.tensor, r.tensor)
