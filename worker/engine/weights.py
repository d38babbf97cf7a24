"""Where VGG19 weights come from: "imagenet", a file path, "caffe:PATH" or "random"."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightsError
from .vgg import CONV_INDICES, build_features, random_init_

logger = logging.getLogger(__name__)

# torchvision VGG19_Weights.IMAGENET1K_V1 (548 MB; the conv part is ~80 MB).
TORCHVISION_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"
TORCHVISION_HASH_PREFIX = "dcbb9e9d"  # torch.hub convention: sha256 prefix in the file name
FEATURES_FILE = "stylequeue-vgg19-features.pth"  # features-only copy made by `weights fetch`
DOWNLOAD_TIMEOUT_S = 30.0

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Weights:
    """Resolved weights: features-only state dict ("N.weight"/"N.bias") and how to feed the model."""

    kind: str  # "torchvision" | "caffe" | "random"  (also the loss preset family)
    source: str
    state: StateDict

    @property
    def normalization(self) -> str:
        return "caffe" if self.kind == "caffe" else "imagenet"


def checkpoints_dir() -> Path:
    """torchvision's weight cache: <torch hub dir>/checkpoints (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: str, seed: int = 0) -> Weights:
    """Turn a weights string into a validated features-only state dict."""
    if spec == "random":
        features = build_features()
        random_init_(features, seed)
        logger.warning("using RANDOM VGG19 weights (seed %d): output is not a real stylisation", seed)
        return Weights("random", f"random(seed={seed})", features.state_dict())
    if spec == "imagenet":
        return _imagenet()
    if spec.startswith("caffe:"):
        path = spec[len("caffe:") :]
        return Weights("caffe", path, features_only(load_state_file(Path(path))))
    return Weights("torchvision", spec, features_only(load_state_file(Path(spec))))


def load_state_file(path: Path) -> StateDict:
    if not path.is_file():
        raise WeightsError("weights_unavailable", f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            "weights_invalid",
            f"{str(path)!r} is not a readable PyTorch state dict ({str(e).strip().splitlines()[0]})",
        ) from e
    if not isinstance(obj, dict):
        raise WeightsError("weights_invalid", f"{str(path)!r} does not hold a state dict")
    return obj


def features_only(state: StateDict) -> StateDict:
    """torchvision layout ("features.N.weight", classifier ignored) or features-only ("N.weight")
    -> features-only, checked against the VGG19 layer shapes."""
    out = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not out:
        out = {k: v for k, v in state.items() if re.fullmatch(r"\d+\.(weight|bias)", k)}
    try:
        build_features().load_state_dict(out, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise WeightsError(
            "weights_invalid",
            "not VGG19 weights in torchvision layout (features.N.weight) or features-only layout "
            f"(N.weight): {' '.join(first)}",
        ) from e
    return {k: v.float() for k, v in out.items()}


def _imagenet() -> Weights:
    ckpt = checkpoints_dir()
    feat = ckpt / FEATURES_FILE
    if feat.is_file():
        verify_sidecar(feat)
        return Weights("torchvision", str(feat), features_only(load_state_file(feat)))
    full = ckpt / TORCHVISION_FILE
    if not full.is_file():
        download(full)
    return Weights("torchvision", str(full), features_only(load_state_file(full)))


def unavailable_message(reason: str) -> str:
    feat = checkpoints_dir() / FEATURES_FILE
    return (
        f"ImageNet VGG19 weights are not installed and cannot be downloaded ({reason}). Remedies: "
        f"run `stylequeue weights fetch` on a connected machine and copy {feat} and {feat}.sha256 "
        "to the same path here (or set TORCH_HOME); or use --weights PATH (a torchvision VGG19 "
        "state dict), --weights caffe:PATH (converted Caffe VGG19), or --weights random (tests only)"
    )


def download(dest: Path) -> None:
    """Download torchvision's VGG19 file to dest (hash-checked); fail at once when offline."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib has no timeout otherwise: never hang
    try:
        logger.info("downloading %s to %s", TORCHVISION_URL, dest)
        torch.hub.download_url_to_file(
            TORCHVISION_URL, str(dest), hash_prefix=TORCHVISION_HASH_PREFIX, progress=False
        )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise WeightsError("weights_unavailable", unavailable_message(str(e))) from e
    except RuntimeError as e:  # hash mismatch
        raise WeightsError("weights_invalid", f"downloaded weights failed verification: {e}") from e
    finally:
        socket.setdefaulttimeout(old)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sidecar(path: Path) -> None:
    side = Path(f"{path}.sha256")
    if not side.is_file():
        raise WeightsError(
            "weights_invalid",
            f"{path} has no {side.name} checksum file; re-run `stylequeue weights fetch`",
        )
    expected = side.read_text().split()[0]
    if sha256_file(path) != expected:
        raise WeightsError(
            "weights_invalid",
            f"{path} does not match its checksum {side.name} (damaged copy); re-run "
            "`stylequeue weights fetch` or copy the file again",
        )


def fetch(from_file: Path | None = None, force: bool = False) -> Path:
    """Make the features-only copy (~80 MB) of torchvision's VGG19 in the hub cache.

    ``from_file``: a full torchvision file to convert instead of downloading. Its sha256 must start
    with the hash in its name (torch.hub convention, e.g. vgg19-dcbb9e9d.pth) or, when the name has
    none, with torchvision's; ``force`` skips that check.
    """
    ckpt = checkpoints_dir()
    src = from_file if from_file is not None else ckpt / TORCHVISION_FILE
    if from_file is None and not src.is_file():
        download(src)
    digest = sha256_file(src)
    m = re.search(r"-([a-f0-9]+)\.", src.name)
    prefix = m.group(1) if m else TORCHVISION_HASH_PREFIX
    if not digest.startswith(prefix) and not force:
        raise WeightsError(
            "weights_invalid",
            f"{src} has sha256 {digest[:16]}..., expected a prefix {prefix}: not the expected file "
            "(use --force to convert it anyway)",
        )
    state = features_only(load_state_file(src))
    ckpt.mkdir(parents=True, exist_ok=True)
    dest = ckpt / FEATURES_FILE
    tmp = dest.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, dest)
    Path(f"{dest}.sha256").write_text(f"{sha256_file(dest)}  {dest.name}  source-sha256={digest}\n")
    logger.info("wrote %s (%d conv layers)", dest, len(CONV_INDICES))
    return dest


def info() -> list[dict[str, object]]:
    """What is installed: one dict per known weights file (path, exists, bytes, sha256, ok)."""
    rows: list[dict[str, object]] = []
    for name in (FEATURES_FILE, TORCHVISION_FILE):
        path = checkpoints_dir() / name
        row: dict[str, object] = {"path": str(path), "exists": path.is_file()}
        if path.is_file():
            row["bytes"] = path.stat().st_size
            row["sha256"] = sha256_file(path)
            if name == FEATURES_FILE:
                side = Path(f"{path}.sha256")
                row["verified"] = side.is_file() and side.read_text().split()[0] == row["sha256"]
            else:
                row["verified"] = str(row["sha256"]).startswith(TORCHVISION_HASH_PREFIX)
        rows.append(row)
    return rows
