"""TransferConfig (every control of a job) and BatchItem, with the defaults and where they come from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from .errors import EngineError

logger = logging.getLogger(__name__)

# Gatys et al. read content at "conv4_2" *after* Caffe's in-place ReLU, i.e. the rectified output:
# that is relu4_2 here (conv4_2 here is the pre-ReLU convolution output, which can be negative).
DEFAULT_CONTENT_LAYERS = ("relu4_2",)
# Gatys / jcjohnson neural-style / the PyTorch tutorial: relu1_1 .. relu5_1, equally weighted (1 each).
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@dataclass(frozen=True)
class LossPreset:
    """Loss weights for one weights family (content, style, tv)."""

    content: float
    style: float
    tv: float


# Losses (see losses.py): content = mean squared feature error; style = sum over layers of
# layer_weight * mean squared error of Grams normalised by c*h*w; tv = mean squared difference of
# neighbouring pixels of the [0, 1] image (size-independent).
PRESETS = {
    # torchvision ImageNet weights ([0,1] RGB, ImageNet mean/std): the PyTorch neural-style tutorial's
    # Gram-MSE recipe, content 1 and style 1e6 with c*h*w-normalised Grams. The tutorial has no TV
    # term, nor do multi-resolution practice scripts (coarse-to-fine already suppresses noise): tv 0.
    "torchvision": LossPreset(content=1.0, style=1e6, tv=0.0),
    # Original Caffe VGG19 (BGR 0-255, mean-subtracted): jcjohnson/neural-style's content 5, style 100,
    # tv 1e-3. Its TV is 0.5*sum of squared differences in 0-255 space; our TV is a mean in [0,1]
    # space, so 1e-3 becomes 1e-3 * 0.5 * 255**2 * (3*512*512) ~= 2.56e7 (equal at 512x512).
    "caffe": LossPreset(content=5.0, style=100.0, tv=2.56e7),
}
PRESETS["random"] = PRESETS["torchvision"]  # random weights use the torchvision normalisation

_CHOICES = {
    "init": ("content", "noise", "gray"),
    "optimizer": ("lbfgs", "adam"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "pooling": ("max", "avg"),
}


@dataclass(frozen=True)
class TransferConfig:
    """Every control of a style-transfer job. None means "the preset/auto value" where noted."""

    size: int = 512  # output long edge (px); 512 fits the 10-minute CPU budget
    min_size: int = 128  # first scale's long edge; crowsonkb starts at 128
    scale_factor: float = 2**0.5  # crowsonkb: sqrt(2) per scale -> 128, 181, 256, 362, 512
    scales: tuple[int, ...] | None = None  # explicit long edges; overrides the three above
    iterations: int | tuple[int, ...] | None = None  # None = auto (schedule.py), int, or per scale
    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    style_layer_weights: tuple[float, ...] | None = None  # None = 1.0 each (Gatys, jcjohnson)
    content_weight: float | None = None  # None = preset of the weights family (PRESETS)
    style_weight: float | None = None  # None = preset
    tv_weight: float | None = None  # None = preset
    style_blend_weights: tuple[float, ...] | None = None  # None = equal; normalised to sum 1
    style_scale: float = 1.0  # style long edge = style_scale * content long edge (jcjohnson)
    preserve_color: bool = False  # luminance-only transfer (Gatys et al. 2016)
    init: str = "content"  # "content" | "noise" | "gray"; jcjohnson and the tutorial start from content
    optimizer: str = "lbfgs"  # Gatys and jcjohnson use L-BFGS; converges in far fewer steps than Adam
    lr: float | None = None  # None: 1.0 for L-BFGS (torch default), 0.02 for Adam (crowsonkb)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas (crowsonkb)
    lbfgs_history: int = 50  # L-BFGS history; ~2*50 image copies (300 MB at 512), reset per scale
    carry_optimizer_state: bool = True  # Adam moments resized and carried across scales (crowsonkb)
    seed: int = 0  # noise init and random weights; same seed + machine + CPU -> bit-identical output
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA when supported, else fp32
    pooling: str = "max"  # VGG's own max pooling (Gatys mentions avg as an option)
    device: str | None = None  # None = the engine's ("auto": cuda:0 if available else cpu)
    weights: str | None = None  # None = the engine's ("imagenet"); see weights.py
    channels_last: bool | None = None  # None = auto: on (faster on CUDA, and 15-25% on this CPU: bench)
    save_every: int = 0  # checkpoint every N iterations as well as at scale ends; 0 = scale ends

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise _invalid(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.size < 16 or self.min_size < 16:
            raise _invalid("size and min_size must be at least 16 px")
        if self.scale_factor <= 1.0:
            raise _invalid(f"scale_factor must be > 1, not {self.scale_factor}")
        if self.scales is not None and (not self.scales or min(self.scales) < 16):
            raise _invalid("scales must be a non-empty list of long edges of at least 16 px")
        if self.style_scale <= 0:
            raise _invalid("style_scale must be > 0")
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(
            self.style_layers
        ):
            raise _invalid("style_layer_weights needs one weight per style layer")
        if self.save_every < 0 or self.lbfgs_history < 1:
            raise _invalid("save_every must be >= 0 and lbfgs_history >= 1")
        its = self.iterations
        if its is not None and min([its] if isinstance(its, int) else list(its) or [0]) < 1:
            raise _invalid("iterations must be at least 1 at every scale")

    def loss_weights(self, family: str) -> LossPreset:
        """Content/style/tv weights: explicit fields, else the preset of the weights family."""
        p = PRESETS[family]
        return LossPreset(
            content=p.content if self.content_weight is None else self.content_weight,
            style=p.style if self.style_weight is None else self.style_weight,
            tv=p.tv if self.tv_weight is None else self.tv_weight,
        )

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 if self.optimizer == "lbfgs" else 0.02

    def layer_weights(self) -> tuple[float, ...]:
        return self.style_layer_weights or tuple(1.0 for _ in self.style_layers)

    def digest(self, extra: Any = None) -> str:
        """sha256 of the fields that change the result (not device/save_every/channels_last)."""
        fields = dataclasses.asdict(self)
        for name in ("device", "save_every", "channels_last"):
            fields.pop(name)
        blob = json.dumps([fields, extra], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass
class BatchItem:
    """One image of a batch: its content, styles, and optional per-item weights (None = config's)."""

    content: Any
    styles: list[Any]
    style_blend_weights: tuple[float, ...] | None = None
    content_weight: float | None = None
    style_weight: float | None = None
    tv_weight: float | None = None


def normalise_blend(weights: tuple[float, ...] | None, n: int) -> list[float]:
    """Blend weights for n styles, normalised to sum 1 (None = equal)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
        raise _invalid(
            f"style blend weights {list(weights)} must be {n} non-negative numbers (one per style) "
            "with a positive sum"
        )
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _invalid(message: str) -> EngineError:
    return EngineError(message, code="invalid_config")
