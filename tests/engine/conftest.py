"""Shared fixtures: small deterministic images and one random-weights engine for the session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.engine import StyleTransfer, TransferConfig
from worker.engine.vgg import VGGFeatures

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)  # the CI machine has 2 cores; bit-identity is per thread count


def _small(name: str, long_edge: int) -> Image.Image:
    im = Image.open(IMAGES / name).convert("RGB")
    im.thumbnail((long_edge, long_edge))
    return im


@pytest.fixture(scope="session")
def content() -> Image.Image:
    return _small("content_chelsea_cat.png", 96)  # 96x64


@pytest.fixture(scope="session")
def content2() -> Image.Image:
    return _small("content_astronaut.png", 96).resize((96, 64))


@pytest.fixture(scope="session")
def style() -> Image.Image:
    return _small("style_hokusai_great_wave.jpg", 96)


@pytest.fixture(scope="session")
def style2() -> Image.Image:
    return _small("style_vangogh_night_cafe.jpg", 96)


@pytest.fixture(scope="session")
def engine() -> StyleTransfer:
    return StyleTransfer(weights="random", device="cpu", seed=0)


def small_config(**kw: object) -> TransferConfig:
    """A 32 -> 48 px, 2-scale job: fast enough for unit tests."""
    base: dict[str, object] = {
        "size": 48,
        "scales": (32, 48),
        "iterations": 4,
        "weights": "random",
        "device": "cpu",
    }
    base.update(kw)
    return TransferConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def vgg_input_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The (h, w) of every tensor VGG19 sees while the test runs, in order."""
    shapes: list[tuple[int, ...]] = []
    original = VGGFeatures.forward

    def spy(self: VGGFeatures, x: torch.Tensor, wanted: frozenset[int]) -> dict[int, torch.Tensor]:
        shapes.append(tuple(x.shape[-2:]))
        return original(self, x, wanted)

    monkeypatch.setattr(VGGFeatures, "forward", spy)
    return shapes
