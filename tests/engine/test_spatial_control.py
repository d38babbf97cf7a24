"""Spatial control: a content mask per style (Gatys et al. 2017); Adam's schedule and iterate EMA."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine import BatchItem, Checkpoint, EngineError, StyleTransfer
from worker.engine.losses import gram, masked_gram, moments
from worker.engine.optim import Stepper
from worker.engine.schedule import build_schedule

from .conftest import small_config


def _half_mask(size: tuple[int, int], left: bool) -> Image.Image:
    w, h = size
    im = Image.new("L", size, 0)
    im.paste(255, (0, 0, w // 2, h) if left else (w // 2, 0, w, h))
    return im


def test_masked_gram_is_the_gram_of_the_region() -> None:
    f = torch.rand(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 6, 8)
    mask[..., :3] = 1.0  # the left three columns
    region = f[..., :3].contiguous()
    assert torch.allclose(masked_gram(f, mask), gram(region), atol=1e-6)
    mean, srm = moments(f, mask)
    assert torch.allclose(mean, region.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(srm, gram(region) * 4, atol=1e-6)
    assert torch.allclose(masked_gram(f, torch.ones(2, 1, 6, 8)), gram(f), atol=1e-6)


def test_a_style_changes_only_its_region(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    """One style masked to the left half: the left half moves away from the content, the right
    half (no style term there, content term only) stays much closer to it."""
    cfg = small_config(iterations=12)
    r = engine.run(content, [style], cfg, masks=[_half_mask(content.size, left=True)])
    plain = engine.run(content, [style], cfg)
    c = torch.tensor(np.asarray(content.resize(r.image.size)), dtype=torch.float32) / 255
    out = torch.tensor(np.asarray(r.image), dtype=torch.float32) / 255
    w = out.shape[1]
    left = (out[:, : w // 2 - 4] - c[:, : w // 2 - 4]).abs().mean()
    right = (out[:, w // 2 + 4 :] - c[:, w // 2 + 4 :]).abs().mean()
    assert left > 2 * right, (float(left), float(right))
    assert plain.metadata["config_digest"] != r.metadata["config_digest"]  # masks enter the digest


def test_two_styles_two_regions_and_a_mixed_batch(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    style2: Image.Image,
) -> None:
    masks = [_half_mask(content.size, True), _half_mask(content.size, False)]
    cfg = small_config(optimizer="adam", lr=0.05, iterations=4)
    alone = engine.run(content, [style, style2], cfg, masks=masks)
    assert alone.metadata["loss_removed"][-1]["style"] > 0
    # a batch mixing a masked item (2 regions) and an unmasked one (1 region, padded): each item
    # is the same as its own run (Adam is per element)
    batch = engine.run_batch(
        [BatchItem(content, [style, style2], masks=masks), BatchItem(content, [style])], cfg
    )
    single = engine.run(content, [style], cfg)
    assert batch.tensor is not None and alone.tensor is not None and single.tensor is not None
    assert (batch.tensor[0:1] - alone.tensor).abs().max() < 1e-3
    assert (batch.tensor[1:2] - single.tensor).abs().max() < 1e-3


def test_masks_are_checked(engine: StyleTransfer, content: Image.Image, style: Image.Image) -> None:
    cfg = small_config(iterations=1)
    with pytest.raises(EngineError) as e:
        engine.run(content, [style], cfg, masks=[_half_mask(content.size, True)] * 2)
    assert e.value.code == "invalid_mask" and "2 masks given for 1 styles" in str(e.value)
    square = Image.new("L", (64, 64), 255)  # the content is 96x64
    with pytest.raises(EngineError) as e:
        engine.run(content, [style], cfg, masks=[square])
    assert e.value.code == "invalid_mask" and "aspect ratio" in str(e.value)
    with pytest.raises(EngineError) as e:
        engine.run(content, [style], cfg, masks=[Image.new("L", content.size, 0)])
    assert e.value.code == "invalid_mask" and "black everywhere" in str(e.value)
    buf = io.BytesIO()
    _half_mask((192, 128), True).save(buf, "PNG")  # bytes, twice the content's size: accepted
    engine.run(content, [style], cfg, masks=[buf.getvalue()])


def test_adam_has_its_own_schedule() -> None:
    assert [n for _, n in build_schedule((64, 64), size=512, optimizer="adam")] == [1000, 500, 500, 500, 500]
    assert [n for _, n in build_schedule((64, 64), size=512)] == [317, 209, 138, 91, 60]


def _noisy_quadratic(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """|x - (0.5 + noise)|^2 with fresh noise at every call: a stochastic objective whose minimum
    in expectation is 0.5 (the style loss is not noisy, but Adam's fixed lr jitters the same way)."""
    g = torch.Generator().manual_seed(seed)

    def fn(x: torch.Tensor) -> torch.Tensor:
        loss = (x - 0.5 - 0.1 * torch.randn(x.shape, generator=g)).pow(2).sum()
        return torch.stack([loss, loss, loss, loss * 0, loss * 0])

    return fn


def test_adam_delivers_the_average_of_its_iterates() -> None:
    """At a fixed lr Adam keeps jittering around the minimum; the bias-corrected EMA does not."""
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = Stepper(x0, _noisy_quadratic(1), "adam", 0.05)
    averaged = Stepper(x0, _noisy_quadratic(1), "adam", 0.05, ema_decay=0.98)
    assert torch.allclose(averaged.result(), x0, atol=1e-6)  # bias-corrected: starts at x0
    for _ in range(300):
        plain.step()
        averaged.step()
    assert torch.equal(plain.x, averaged.x)  # the EMA does not change the iterates
    err_last = (averaged.x.detach() - 0.5).abs().mean()
    err_avg = (averaged.result() - 0.5).abs().mean()
    assert err_avg < err_last / 2, (float(err_avg), float(err_last))
    assert torch.equal(plain.result(), plain.x.detach())  # no EMA: the iterate


def test_adam_checkpoint_keeps_the_iterate_and_the_average(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    cfg = small_config(optimizer="adam", iterations=4, save_every=2)
    saved: list[Checkpoint] = []
    r = engine.run(content, [style], cfg, on_checkpoint=saved.append)
    mid = saved[0]
    assert mid.iterate is not None and mid.average is not None and not mid.end_of_scale
    assert not torch.equal(mid.iterate, mid.image)  # the preview is the average, not x
    resumed = engine.run(content, [style], cfg, resume=Checkpoint.from_bytes(mid.to_bytes()))
    assert torch.equal(resumed.tensor, r.tensor)  # type: ignore[arg-type]
    no_ema = engine.run(content, [style], small_config(optimizer="adam", iterations=4, ema_decay=0))
    assert not torch.equal(no_ema.tensor, r.tensor)  # type: ignore[arg-type]


def test_w2_style_loss_runs_relative_and_masked(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
) -> None:
    """style_loss="w2": the style term (relative W2, target square roots cached per scale) falls at
    every scale, with and without a mask, and is a different job from the Gram loss."""
    cfg = small_config(style_loss="w2", iterations=6)
    r = engine.run(content, [style], cfg)
    assert all(s["style"] is not None and s["style"] > 0.1 for s in r.metadata["loss_removed"])
    masked = engine.run(content, [style], cfg, masks=[_half_mask(content.size, left=True)])
    assert masked.metadata["loss_removed"][-1]["style"] > 0
    assert cfg.digest() != small_config(iterations=6).digest()
