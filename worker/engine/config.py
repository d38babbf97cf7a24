"""TransferConfig (every control of a job) and BatchItem, with the defaults and where they come from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from .checks import check_blend, check_weight, finite, invalid
from .errors import EngineError
from .schedule import MAX_SCALE_FACTOR, MAX_SCALES, MIN_SCALE_FACTOR, long_edges

logger = logging.getLogger(__name__)

# Gatys et al. read content at "conv4_2" *after* Caffe's in-place ReLU, i.e. the rectified output:
# that is relu4_2 here (conv4_2 here is the pre-ReLU convolution output, which can be negative).
DEFAULT_CONTENT_LAYERS = ("relu4_2",)
# Gatys / jcjohnson neural-style / crowsonkb: relu1_1 .. relu5_1 (the PyTorch tutorial instead uses the
# pre-ReLU conv1_1, conv1_2, conv2_1, conv2_2, conv3_1).
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# Relative terms: each style layer's weight is 4x the next deeper one's, normalised to sum 1, as
# crowsonkb/style-transfer-pytorch ([256, 64, 16, 4, 1] / 341 for the five default layers). Its
# per-layer losses are scale-free like our relative ones; on raw c*h*w Grams the same decay would
# hand relu1_1 (already ~94 % of an equally weighted raw style term) nearly everything.
LAYER_DECAY = 4.0


@dataclass(frozen=True)
class LossPreset:
    """Loss weights (content, style, tv)."""

    content: float
    style: float
    tv: float


# loss_terms="relative" (the default, losses.py): content = mean((F - P)^2) / mean(P^2); each style
# layer = mean((G - T)^2) / mean(T^2); tv = tv(x) / tv(content at this scale). Every term is 0 at a
# perfect match and O(0.1-1) at a content init whatever the weights family, pooling or resolution, so
# one preset serves all families. Derived, not yet confirmed on real weights (bench/calibrate.py is the
# sweep for that first run):
# - style 10 : content 1. The references' raw ratios for torchvision features run from ~2e3
#   (jcjohnson's 100:5 carried over from Caffe) to 1e5 (pytorch/examples fast-neural-style, strongly
#   stylised); the old preset's 1e6 was judged 5-500x too style-heavy (engine review D1). Converted
#   with the relu1_1 Gram energy / relu4_2 feature energy of the test images (~3e-5 with seeded random
#   weights; larger with trained ones, whose activations are bigger and enter the Gram squared), the
#   old 1e6 is ~40 relative and the references ~0.1-4 on random weights, ~1-100 on real ones: 10 is
#   the middle of that range in decades.
# - tv 0.01: a small smoothing term; 1 is "as rough as the content", so a result twice as rough as its
#   content costs 2 % of a content term that is fully wrong. Coarse-to-fine already suppresses most
#   noise (crowsonkb uses tv 2 on its own, unnormalised, units).
RELATIVE_PRESET = LossPreset(content=1.0, style=10.0, tv=0.01)

# loss_terms="raw": the unnormalised terms (content = mean squared feature error; style = sum over
# layers of layer_weight * mean squared error of Grams normalised by c*h*w; tv = mean squared
# difference of neighbouring pixels of the [0, 1] image), with each family's published recipe and
# equal layer weights (jcjohnson). Kept to reproduce those recipes exactly.
RAW_PRESETS = {
    # torchvision ImageNet weights ([0,1] RGB, ImageNet mean/std): the PyTorch neural-style tutorial's
    # Gram-MSE recipe, content 1 and style 1e6 with c*h*w-normalised Grams, no TV term.
    "torchvision": LossPreset(content=1.0, style=1e6, tv=0.0),
    # Original Caffe VGG19 (BGR 0-255, mean-subtracted): jcjohnson/neural-style's content 5, style 100,
    # tv 1e-3. Its TV is 0.5*sum of squared differences in 0-255 space; our TV is a mean in [0,1]
    # space, so 1e-3 becomes 1e-3 * 0.5 * 255**2 * (3*512*512) ~= 2.56e7 (equal at 512x512).
    "caffe": LossPreset(content=5.0, style=100.0, tv=2.56e7),
}
RAW_PRESETS["random"] = RAW_PRESETS["torchvision"]  # random weights use the torchvision normalisation

_CHOICES = {
    "init": ("content", "noise", "gray"),
    "optimizer": ("lbfgs", "adam"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "pooling": ("max", "avg"),
    "color": ("none", "luminance", "histogram"),
    "loss_terms": ("relative", "raw"),
    "style_loss": ("gram", "w2"),
}


@dataclass(frozen=True)
class TransferConfig:
    """Every control of a style-transfer job. None means "the preset/auto value" where noted."""

    size: int = 512  # output long edge (px); 512 fits the 10-minute CPU budget
    min_size: int = 128  # first scale's long edge; crowsonkb starts at 128
    scale_factor: float = 2**0.5  # crowsonkb: sqrt(2) per scale -> 128, 181, 256, 362, 512; in [1.1, 4]
    scales: tuple[int, ...] | None = None  # explicit long edges; overrides the three above
    iterations: int | tuple[int, ...] | None = None  # None = auto (schedule.py), int, or per scale
    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    # None = relative terms: decaying by LAYER_DECAY with depth (crowsonkb); raw terms: 1.0 each
    style_layer_weights: tuple[float, ...] | None = None
    # "relative": each term divided by its target's energy (see RELATIVE_PRESET); "raw": the papers'
    # unnormalised terms with the weights family's recipe (RAW_PRESETS)
    loss_terms: str = "relative"
    # "gram": MSE of Gram matrices (Gatys); "w2": Wasserstein-2 distance between Gaussian fits of the
    # features, mean and covariance (crowsonkb's current loss; w2.py): one eigendecomposition per
    # style layer per iteration, about O(C^3) whatever the image size
    style_loss: str = "gram"
    # What the three loss weights mean: each scale minimises (wc*content + ws*style + wtv*tv) divided
    # by that same sum at the scale's first evaluation (losses.LossFn), so only their ratios count:
    # they set the balance between the terms, and all three times k is the same job (L-BFGS stalled
    # below k ~ 1e-2 before). 0 switches a term off.
    content_weight: float | None = None  # None = the preset (RELATIVE_PRESET, or RAW_PRESETS[family])
    style_weight: float | None = None  # None = preset
    tv_weight: float | None = None  # None = preset
    style_blend_weights: tuple[float, ...] | None = None  # None = equal; normalised to sum 1
    style_scale: float = 1.0  # style long edge = style_scale * content long edge (jcjohnson)
    # crowsonkb/jcjohnson resize styles to the content scale; upscaling a small style past its native
    # size only blurs its texture, so by default we cap at native size (True: jcjohnson's rule as is)
    style_upscale: bool = False
    # Colour control (Gatys et al. 2017, sec. 3; color.py): "none"; "luminance" optimises the
    # luminance alone and delivers it with the content's chroma; "histogram" gives each style the
    # content's colour mean and covariance before optimising.
    color: str = "none"
    preserve_color: bool = False  # kept for compatibility: True is color="luminance" (both set)
    init: str = "content"  # "content" | "noise" | "gray"; jcjohnson and the tutorial start from content
    optimizer: str = "lbfgs"  # Gatys and jcjohnson use L-BFGS; converges in far fewer steps than Adam
    lr: float | None = None  # None: 1.0 for L-BFGS (torch default), 0.02 for Adam (crowsonkb)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas (crowsonkb)
    # Adam: each scale's result is the bias-corrected EMA of its iterates with this decay (crowsonkb's
    # 0.99: about the last 100 steps); 0 = the last iterate. Ignored by L-BFGS.
    ema_decay: float = 0.99
    lbfgs_history: int = 50  # L-BFGS history; ~2*50 image copies (300 MB at 512), reset per scale
    # Largest change of any pixel ([0, 1] range) in one L-BFGS step; longer steps are shrunk (a trust
    # region: Gatys and jcjohnson run lr 1 with no line search and no cap). 0.25 measured at 48 px,
    # random weights: without it one ill-conditioned curvature pair moved pixels by 30 and the loss
    # rose 77x; with 0.1-0.5 the loss fell monotonically, as far as the uncapped run where that
    # one never jumped (optim.Stepper._cap_step).
    lbfgs_max_step: float = 0.25
    carry_optimizer_state: bool = True  # Adam moments resized and carried across scales (crowsonkb)
    seed: int = 0  # noise init and random weights; same seed + machine + CPU -> bit-identical output
    # "auto" = bf16 autocast on CUDA when supported, else fp32; "fp16" (CUDA only) runs with dynamic
    # loss scaling (scaler.py): unscaled, its gradients underflow to zero at 512 px
    precision: str = "auto"
    # conv1_1 pads by replicating edge pixels, not zeros (crowsonkb/style-transfer-pytorch: fewer edge
    # artefacts); False is torchvision's zero padding everywhere
    pad_replicate: bool = True
    # VGG's own max pooling; "avg" (Gatys mentions it) is scaled to max's magnitudes (vgg.AVG_POOL_SCALE)
    pooling: str = "max"
    device: str | None = None  # None = the engine's ("auto": cuda:0 if available else cpu)
    weights: str | None = None  # None = the engine's ("imagenet"); see weights.py
    channels_last: bool | None = None  # None = auto: on (faster on CUDA, and 15-25% on this CPU: bench)
    save_every: int = 0  # checkpoint every N iterations as well as at scale ends; 0 = scale ends
    # At most this many scales (explicit or from size/min_size/scale_factor): each is a VGG pass over
    # the styles and a checkpoint. 16 is far more than the 5 of the default pyramid.
    max_scales: int = MAX_SCALES
    # Consecutive NaN/Inf recoveries (each restores the last good image and halves lr) without a
    # finite step in between before the job fails with "diverged"; 5 halvings is lr / 32.
    max_recoveries: int = 5

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise invalid(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        self._check_color()
        self._check_schedule()
        self._check_numbers()
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise invalid("style_layer_weights needs one weight per style layer")
        if self.save_every < 0 or self.lbfgs_history < 1 or self.max_recoveries < 0:
            raise invalid("save_every and max_recoveries must be >= 0 and lbfgs_history >= 1")

    def _check_color(self) -> None:
        """preserve_color and color="luminance" are one setting: make both say so (so they also
        give one digest); preserve_color with another colour mode is a contradiction."""
        if self.preserve_color and self.color == "histogram":
            raise invalid(
                'preserve_color means color="luminance"; it cannot be combined with color="histogram"'
            )
        if self.preserve_color or self.color == "luminance":
            object.__setattr__(self, "color", "luminance")  # frozen: set once, here
            object.__setattr__(self, "preserve_color", True)

    def _check_schedule(self) -> None:
        if self.size < 16 or self.min_size < 16:
            raise invalid("size and min_size must be at least 16 px")
        if not MIN_SCALE_FACTOR <= self.scale_factor <= MAX_SCALE_FACTOR:  # False for NaN too
            raise invalid(
                f"scale_factor must be between {MIN_SCALE_FACTOR} and {MAX_SCALE_FACTOR}, "
                f"not {self.scale_factor}"
            )
        if self.max_scales < 1:
            raise invalid("max_scales must be at least 1")
        if self.scales is not None and (not self.scales or min(self.scales) < 16):
            raise invalid("scales must be a non-empty list of long edges of at least 16 px")
        if self.scales is not None and len(self.scales) > self.max_scales:
            raise EngineError(
                "too_many_scales",
                f"{len(self.scales)} scales given; the maximum is {self.max_scales}: give fewer scales",
            )
        if self.scales is None:
            long_edges(self.size, self.min_size, self.scale_factor, self.max_scales)  # too_many_scales
        its = self.iterations
        if its is not None and min([its] if isinstance(its, int) else list(its) or [0]) < 1:
            raise invalid("iterations must be at least 1 at every scale")

    def _check_numbers(self) -> None:
        """Loss weights finite and >= 0; lr and style_scale finite and > 0; Adam betas in [0, 1)."""
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            if value is not None:
                check_weight(name, value)
        for i, w in enumerate(self.style_layer_weights or ()):
            check_weight(f"style_layer_weights[{i}]", w)
        if self.style_blend_weights is not None:
            check_blend(self.style_blend_weights)
        if self.lr is not None and not (finite(self.lr) and self.lr > 0):
            raise invalid(f"lr must be a finite number > 0, not {self.lr}")
        if not (finite(self.lbfgs_max_step) and self.lbfgs_max_step > 0):
            raise invalid(f"lbfgs_max_step must be a finite number > 0, not {self.lbfgs_max_step}")
        if not (finite(self.style_scale) and self.style_scale > 0):
            raise invalid(f"style_scale must be a finite number > 0, not {self.style_scale}")
        if len(self.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in self.betas):
            raise invalid(f"betas must be two finite numbers in [0, 1), not {self.betas}")
        if not (finite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise invalid(f"ema_decay must be a finite number in [0, 1), not {self.ema_decay}")

    def loss_weights(self, family: str) -> LossPreset:
        """Content/style/tv weights: explicit fields, else the preset (relative terms: one for every
        weights family; raw terms: the family's own recipe)."""
        p = RELATIVE_PRESET if self.loss_terms == "relative" else RAW_PRESETS[family]
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
        """Explicit style_layer_weights, else LAYER_DECAY per layer in list order, summing to 1
        (relative terms), or 1.0 each (raw terms, as jcjohnson)."""
        if self.style_layer_weights is not None:
            return self.style_layer_weights
        if self.loss_terms == "raw":
            return tuple(1.0 for _ in self.style_layers)
        decay = [LAYER_DECAY**-i for i in range(len(self.style_layers))]
        return tuple(w / sum(decay) for w in decay)

    def digest(self, extra: Any = None) -> str:
        """sha256 of the fields that change the result (not device/save_every/channels_last, nor the
        limits max_scales/max_recoveries: checkpoints made before they existed still resume)."""
        fields = dataclasses.asdict(self)
        for name in ("device", "save_every", "channels_last", "max_scales", "max_recoveries"):
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
    # Spatial control: one mask per style (anything load_image accepts), read as luminance in [0, 1]
    # over the content (white: that style applies here); None: every style everywhere, blended
    masks: list[Any] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Per-item weights finite and >= 0 (the blend also with a positive finite sum)."""
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            if value is not None:
                check_weight(name, value)
        if self.style_blend_weights is not None:
            check_blend(self.style_blend_weights)


def item_loss_weights(item: BatchItem, preset: LossPreset) -> tuple[float, float, float]:
    """(content, style, tv) of one item: its own weights, else the config's/preset's; re-checked,
    since a BatchItem is mutable."""
    item.check()
    return (
        preset.content if item.content_weight is None else item.content_weight,
        preset.style if item.style_weight is None else item.style_weight,
        preset.tv if item.tv_weight is None else item.tv_weight,
    )
