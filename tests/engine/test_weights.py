"""Weights from files the test writes, the offline imagenet error, fetch --from and info."""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.error
from pathlib import Path

import pytest
import torch

from worker.engine import StyleTransfer, WeightsError
from worker.engine import weights as w
from worker.engine.vgg import LAYER_INDEX, build_features, random_init_


def _features(seed: int) -> dict[str, torch.Tensor]:
    f = build_features()
    random_init_(f, seed)
    return f.state_dict()


def _model_weights(engine: StyleTransfer, spec: str) -> dict[str, torch.Tensor]:
    model = engine.model(spec, torch.device("cpu"), "max", LAYER_INDEX["relu5_1"])
    return model.layers.state_dict()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_layout_and_features_only(tmp_path: Path) -> None:
    sd = _features(7)
    full = {f"features.{k}": v for k, v in sd.items()}
    full["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(full, tmp_path / "full.pth")
    torch.save(sd, tmp_path / "feat.pth")
    engine = StyleTransfer(device="cpu")
    for name in ("full.pth", "feat.pth"):
        got = _model_weights(engine, str(tmp_path / name))
        assert torch.equal(got["0.weight"], sd["0.weight"])
        assert torch.equal(got["28.bias"], sd["28.bias"])  # conv5_1
        assert engine.load_weights(str(tmp_path / name)).kind == "torchvision"


def test_caffe_prefix_sets_caffe_normalisation(tmp_path: Path) -> None:
    sd = _features(3)
    torch.save({f"features.{k}": v for k, v in sd.items()}, tmp_path / "caffe.pth")
    engine = StyleTransfer(device="cpu")
    spec = f"caffe:{tmp_path / 'caffe.pth'}"
    assert torch.equal(_model_weights(engine, spec)["2.weight"], sd["2.weight"])
    model = engine.model(spec, torch.device("cpu"), "max", 1)
    x = torch.rand(1, 3, 4, 4)
    mean_bgr = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), x.flip(1) * 255 - mean_bgr)
    assert engine.load_weights(spec).kind == "caffe"


def test_invalid_and_missing_files(tmp_path: Path) -> None:
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError) as e:
        w.resolve_weights(str(tmp_path / "bad.pth"))
    assert e.value.code == "weights_invalid"
    with pytest.raises(WeightsError) as e:
        w.resolve_weights(str(tmp_path / "junk.pth"))
    assert e.value.code == "weights_invalid"
    with pytest.raises(WeightsError) as e:
        w.resolve_weights(str(tmp_path / "nope.pth"))
    assert e.value.code == "weights_unavailable"


def test_imagenet_offline_fails_fast(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kw: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        w.resolve_weights("imagenet")
    assert time.perf_counter() - t0 < 2
    assert e.value.code == "weights_unavailable"
    msg = str(e.value)
    for remedy in (
        "stylequeue weights fetch",
        "--weights PATH",
        "--weights caffe:PATH",
        "--weights random",
        str(torch_home / w.FEATURES_FILE),
    ):
        assert remedy in msg


def test_fetch_from_file_then_imagenet_uses_it(torch_home: Path, tmp_path: Path) -> None:
    sd = _features(11)
    src = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in sd.items()}, src)
    with pytest.raises(WeightsError, match="expected a prefix"):  # not torchvision's hash
        w.fetch(src)
    named = tmp_path / f"vgg19-{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}.pth"
    src.rename(named)
    dest = w.fetch(named)
    assert dest == torch_home / w.FEATURES_FILE and Path(f"{dest}.sha256").is_file()
    loaded = w.resolve_weights("imagenet")
    assert loaded.source == str(dest) and loaded.kind == "torchvision"
    assert torch.equal(loaded.state["34.weight"], sd["34.weight"])
    rows = {Path(str(r["path"])).name: r for r in w.info()}
    assert rows[w.FEATURES_FILE]["verified"] is True
    assert rows[w.TORCHVISION_FILE]["exists"] is False
    dest.write_bytes(dest.read_bytes()[:-1] + b"x")  # damaged copy
    with pytest.raises(WeightsError, match="checksum"):
        w.resolve_weights("imagenet")


def test_random_weights_are_flagged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = w.resolve_weights("random", seed=5)
    assert loaded.kind == "random" and "RANDOM" in caplog.text
    assert torch.equal(loaded.state["0.weight"], _features(5)["0.weight"])
