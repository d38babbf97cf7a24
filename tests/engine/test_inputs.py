"""Styles capped at native size, inputs shrunk once per job, replicate padding on conv1_1."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from worker import run_cli
from worker.engine import StyleTransfer, TransferConfig
from worker.engine.images import resize
from worker.engine.inputs import shrink_inputs
from worker.engine.items import prepare_item
from worker.engine.schedule import build_schedule, check_runnable, style_size
from worker.engine.vgg import LAYER_INDEX

from .conftest import small_config


def test_style_size_capped_at_native_unless_upscale() -> None:
    assert style_size((40, 60), (64, 96), 1.0, upscale=False) == (40, 60)  # not 64x96
    assert style_size((40, 60), (64, 96), 1.0, upscale=True) == (64, 96)
    assert style_size((40, 60), (32, 48), 0.5, upscale=False) == (16, 24)  # shrinking unchanged
    assert TransferConfig().style_upscale is False
    check_runnable([(32, 48)], [(16, 40)], 4.0, upscale=False)  # native 16 px side: runnable


def _style_passes(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    shapes: list[tuple[int, ...]],
    **kw: object,
) -> list[tuple[int, ...]]:
    shapes.clear()
    engine.run(content, [style], small_config(iterations=1, **kw))
    return [s for s in shapes if s not in {(21, 32), (32, 48)}]


def test_job_never_upscales_a_small_style(
    engine: StyleTransfer,
    content: Image.Image,
    style: Image.Image,
    vgg_input_shapes: list[tuple[int, ...]],
) -> None:
    small = style.resize((40, 20))  # native long edge 40 < the 48 px scale
    capped = _style_passes(engine, content, small, vgg_input_shapes)
    assert max(max(s) for s in capped) == 40 and (20, 40) in capped
    grown = _style_passes(engine, content, small, vgg_input_shapes, style_upscale=True)
    assert max(max(s) for s in grown) == 48 and (24, 48) in grown


def test_shrink_inputs_once_to_largest_scale() -> None:
    g = torch.Generator().manual_seed(0)
    # photo-like (smooth) inputs: white noise at 400 px has nothing a 32 px image could keep
    content = resize(torch.rand(1, 3, 15, 20, generator=g), (300, 400))
    style = resize(torch.rand(1, 3, 16, 20, generator=g), (200, 250))
    schedule = build_schedule((300, 400), size=64, scales=(32, 64), iterations=1)
    for mode in ("none", "luminance"):
        item = prepare_item(content, [style], [1.0], (1.0, 1.0, 0.0), mode)
        [small] = shrink_inputs([item], schedule, 1.0, False)
        assert small.content.shape[-2:] == (48, 64) and small.original.shape[-2:] == (48, 64)
        assert small.styles[0].shape[-2:] == (51, 64) and small.style_hws == [(200, 250)]
        assert torch.equal(small.content, resize(item.content, (48, 64)))  # largest scale: exact
        at32 = resize(small.content, (24, 32))
        assert (at32 - resize(item.content, (24, 32))).abs().max() < 0.05
        st = resize(small.styles[0], style_size((200, 250), (24, 32), 1.0))
        assert (st - resize(item.styles[0], style_size((200, 250), (24, 32), 1.0))).abs().max() < 0.05
    [same] = shrink_inputs([item], build_schedule((300, 400), size=800, scales=(800,)), 1.0, False)
    assert same.content is item.content and same.styles[0] is item.styles[0]  # never enlarged


def test_conv1_1_pads_by_replication(engine: StyleTransfer) -> None:
    cpu, first = torch.device("cpu"), LAYER_INDEX["conv1_1"]
    model = engine.model("random", cpu, "max", first)
    assert model.layers[0].padding_mode == "replicate"
    flat = torch.full((1, 3, 32, 32), 0.3)
    out = model(flat, frozenset({first}))[first]
    assert (out - out[..., :1, :1]).abs().max() < 1e-5  # spatially constant, edges included
    zeros = engine.model("random", cpu, "max", first, pad_replicate=False)
    assert zeros.layers[0].padding_mode == "zeros"
    out0 = zeros(flat, frozenset({first}))[first]
    assert (out0 - out0[..., 16:17, 16:17]).abs().max() > 1e-3  # zero padding: edges differ
    assert TransferConfig().pad_replicate is True


@pytest.mark.parametrize("argv, expected", [([], None), (["--style-upscale"], True)])
def test_cli_style_upscale(argv: list[str], expected: bool | None) -> None:
    parser = argparse.ArgumentParser()
    run_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "c.png", "s.png", "-o", "o.png", *argv])
    assert args.style_upscale is expected
