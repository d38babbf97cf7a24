"""VGG19 feature extractor: torchvision's ``vgg19().features`` layout, frozen, truncated after the
deepest layer in use, with the input normalisation inside the model.

Layer names mean what they say: ``convX_Y`` is the convolution output *before* its ReLU (can be
negative) and ``reluX_Y`` the rectified output. torchvision applies ReLU in place, which silently turns
a stored conv output into the ReLU'd one; here a ReLU runs in place only when the conv output before
it is not requested.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EngineError

logger = logging.getLogger(__name__)

# torchvision.models.vgg.cfgs["E"] (VGG19): channels per conv, "M" = pooling.
VGG19_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _layer_names() -> list[str]:
    names, block, conv = [], 1, 0
    for v in VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return names


LAYER_NAMES = _layer_names()  # index in vgg19().features -> name, e.g. 21 -> conv4_2, 22 -> relu4_2
LAYER_INDEX = {name: i for i, name in enumerate(LAYER_NAMES)}
CONV_INDICES = [i for i, n in enumerate(LAYER_NAMES) if n.startswith("conv")]


def layer_index(name: str) -> int:
    if name not in LAYER_INDEX:
        raise EngineError(
            "invalid_config",
            f"unknown VGG19 layer {name!r}; use names like conv4_2, relu4_2 or pool3",
        )
    return LAYER_INDEX[name]


# Average pooling shrinks activations (the mean of a 2x2 window of ReLU outputs is below its max),
# and the shrinkage compounds over the 4 pools before relu5_1: the balance moves toward relu1_1 and
# style (review B5; here at 96 px, random weights, unscaled avg/max: content term 0.24-0.31x, relu5_1
# style term 0.016-0.028x). crowsonkb/style-transfer-pytorch multiplies every average-pool output
# by 2.0 (VGGFeatures.pooling_scales = {'max': 1, 'average': 2, 'l2': 0.78}: "Changing the pooling
# type from max results in the scale of activations changing, so rescale them. Gatys et al. (2015)
# do not do this.") with torchvision's trained weights, whose sparse activations put a window's max
# near twice its mean. Caffe weights are trained the same way: 2.0 too (assumed, not measured).
# Random (kaiming) weights have dense, smooth activations, and 2.0 overshoots by ~1.6x per pool (the
# relu5_1 style term 1800x); 1.25 is measured for them (chelsea cat + Hokusai at 96 px: every term
# within 1.2x of max pooling's; astronaut + van Gogh, not used to choose it: within 1.8x).
AVG_POOL_SCALE = {"torchvision": 2.0, "caffe": 2.0, "random": 1.25}


class ScaledAvgPool2d(nn.AvgPool2d):
    """2x2 average pooling times a constant (see AVG_POOL_SCALE); no parameters or buffers, so the
    state dict is torchvision's."""

    def __init__(self, scale: float) -> None:
        super().__init__(2, 2)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def build_features(
    pooling: str = "max", avg_scale: float = 1.0, pad_replicate: bool = False
) -> nn.Sequential:
    """The 37 layers of torchvision's vgg19().features (ReLUs applied functionally in forward);
    pooling="avg" uses average pooling times avg_scale (AVG_POOL_SCALE of the weights kind).
    pad_replicate: conv1_1 pads by replicating the border, as crowsonkb/style-transfer-pytorch does
    (``self.model[0] = self._change_padding_mode(self.model[0], 'replicate')``, "Reduces edge
    artifacts."); the parameters are the same either way."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG19_CFG:
        if v == "M":
            pool = nn.MaxPool2d(2, 2) if pooling == "max" else ScaledAvgPool2d(avg_scale)
            layers.append(pool)
        else:
            replicate = pad_replicate and not layers  # conv1_1 only
            conv = nn.Conv2d(
                in_ch, int(v), kernel_size=3, padding=1, padding_mode="replicate" if replicate else "zeros"
            )
            layers += [conv, nn.ReLU()]
            in_ch = int(v)
    return nn.Sequential(*layers)


def random_init_(features: nn.Sequential, seed: int) -> None:
    """torchvision's VGG init (kaiming normal, fan_out, zero bias) from a local seeded generator."""
    g = torch.Generator().manual_seed(seed)
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class ModelKey:
    weights: str
    device: str
    pooling: str
    deepest: int
    pad_replicate: bool = True


class VGGFeatures(nn.Module):
    """Frozen, truncated VGG19 that returns the requested layers' outputs."""

    def __init__(self, features: nn.Sequential, deepest: int, normalization: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(*list(features)[: deepest + 1])
        self.caffe = normalization == "caffe"
        mean = CAFFE_MEAN_BGR if self.caffe else IMAGENET_MEAN
        std = (1.0, 1.0, 1.0) if self.caffe else IMAGENET_STD
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the network's input space."""
        if self.caffe:  # original Caffe VGG: BGR, 0-255, mean-subtracted
            x = x.flip(1) * 255.0
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, wanted: frozenset[int]) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> {layer index: (B, C, h, w) activation} for the wanted layers."""
        x = self.normalize(x)
        out: dict[int, torch.Tensor] = {}
        last = max(wanted)
        for i, layer in enumerate(self.layers):
            # in-place ReLU saves memory, but would overwrite a conv output we were asked for
            x = F.relu(x, inplace=(i - 1) not in wanted) if isinstance(layer, nn.ReLU) else layer(x)
            if i in wanted:
                out[i] = x
            if i >= last:
                break
        return out
