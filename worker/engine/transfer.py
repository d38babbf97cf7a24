"""Public entry points: StyleTransfer (models cached for reuse across jobs) and stylize()."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import Checkpoint
from .checks import normalise_blend
from .config import BatchItem, TransferConfig, item_loss_weights
from .errors import EngineError
from .images import load_image, pil_to_tensor, tensor_to_pil
from .inputs import shrink_inputs
from .items import PreparedItem, prepare_item
from .losses import autocast
from .pyramid import Progress, Pyramid
from .schedule import Schedule, build_schedule, check_runnable
from .vgg import AVG_POOL_SCALE, LAYER_INDEX, ModelKey, VGGFeatures, build_features, layer_index
from .weights import Weights, resolve_weights

logger = logging.getLogger(__name__)

ProgressFn = Callable[[Progress], Any]
CheckpointFn = Callable[[Checkpoint], Any]


@dataclass
class Result:
    image: Image.Image  # the first (or only) output, RGB
    images: list[Image.Image] = field(default_factory=list)  # one per batch item
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor: torch.Tensor | None = None  # (B, 3, H, W) fp32 cpu in [0, 1], before 8-bit rounding


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise EngineError("invalid_config", f"unknown device {spec!r}; use auto, cpu or cuda:N") from e
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise EngineError("device_unavailable", f"device {spec} is not available here; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """dtype for autocast on the VGG pass, None for plain fp32 (Gram and losses are always fp32).
    float16 makes the job scale its loss (scaler.py); bf16 has fp32's range and needs no scaling."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise EngineError("invalid_config", "fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class StyleTransfer:
    """Holds the VGG19 models for reuse across jobs in one process, cached per
    (weights, device, pooling, deepest layer)."""

    def __init__(self, weights: str = "imagenet", device: str = "auto", seed: int = 0) -> None:
        self.weights, self.device, self.seed = weights, device, seed
        self._weights: dict[str, Weights] = {}
        self._models: dict[ModelKey, VGGFeatures] = {}

    def load_weights(self, spec: str | None = None) -> Weights:
        spec = spec or self.weights
        if spec not in self._weights:
            self._weights[spec] = resolve_weights(spec, self.seed)
        return self._weights[spec]

    def model(
        self, spec: str, device: torch.device, pooling: str, deepest: int, *, pad_replicate: bool = True
    ) -> VGGFeatures:
        key = ModelKey(spec, str(device), pooling, deepest, pad_replicate)
        if key not in self._models:
            w = self.load_weights(spec)
            features = build_features(pooling, AVG_POOL_SCALE.get(w.kind, 2.0), pad_replicate)
            features.load_state_dict(w.state)
            self._models[key] = VGGFeatures(features, deepest, w.normalization).to(device)
            logger.info(
                "loaded VGG19 (%s, %s, %s pooling, up to %s)",
                w.source,
                device,
                pooling,
                list(LAYER_INDEX)[deepest],
            )
        return self._models[key]

    def run(
        self,
        content: Any,
        styles: Any,
        config: TransferConfig | None = None,
        *,
        masks: Sequence[Any] | None = None,
        on_progress: ProgressFn | None = None,
        on_checkpoint: CheckpointFn | None = None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Stylise one content image with one or more styles (a batch of one); ``masks``: one per
        style, where on the content each applies (BatchItem.masks)."""
        config = config or TransferConfig()
        style_list = list(styles) if isinstance(styles, (list, tuple)) else [styles]
        item = BatchItem(
            content, style_list, config.style_blend_weights, masks=None if masks is None else list(masks)
        )
        return self.run_batch(
            [item], config, on_progress=on_progress, on_checkpoint=on_checkpoint, resume=resume
        )

    def run_batch(
        self,
        items: Sequence[BatchItem],
        config: TransferConfig | None = None,
        *,
        on_progress: ProgressFn | None = None,
        on_checkpoint: CheckpointFn | None = None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Stylise several same-sized images in one batch (B, 3, H, W); Result.images has one each."""
        config = config or TransferConfig()
        if not items:
            raise EngineError("invalid_config", "a batch needs at least one item")
        t0 = time.perf_counter()
        spec = config.weights or self.weights
        weights = self.load_weights(spec)
        device = resolve_device(config.device or self.device)
        dtype = resolve_precision(config.precision, device)
        layers = [layer_index(n) for n in (*config.content_layers, *config.style_layers)]
        # Inputs and schedule first: an unrunnable job fails before a model is built or a step taken
        prepared, digest_parts = _prepare(items, config, weights)
        schedule = _batch_schedule(prepared, config)
        prepared = shrink_inputs(prepared, schedule, config.style_scale, config.style_upscale)
        model = self.model(spec, device, config.pooling, max(layers), pad_replicate=config.pad_replicate)
        # channels_last (NHWC): the usual win for convolutions on CUDA, and measured 15-25 % faster
        # than NCHW for VGG19 forward+backward on the 2-core CPU too (bench/engine.py)
        channels_last = config.channels_last if config.channels_last is not None else True
        if channels_last:
            model.to(memory_format=torch.channels_last)
        digest = config.digest([spec, weights.kind, digest_parts])
        run = Pyramid(
            model,
            prepared,
            config,
            schedule,
            device=device,
            cast=lambda: autocast(device, dtype),
            channels_last=channels_last,
            digest=digest,
            on_progress=on_progress,
            on_checkpoint=on_checkpoint,
            loss_scaling=dtype == torch.float16,
        )
        with torch.random.fork_rng(devices=[]):  # nothing global is consumed, but be safe
            torch.manual_seed(config.seed)
            x = run.finish(run.run(resume))
        images = [tensor_to_pil(x[i]) for i in range(x.shape[0])]
        meta = {
            "weights_kind": weights.kind,
            "weights_source": weights.source,
            "random_weights": weights.kind == "random",
            "seed": config.seed,
            "scales": [list(hw) for hw, _ in schedule],
            "iterations": [n for _, n in schedule],
            "steps": run.step,
            "seconds": round(time.perf_counter() - t0, 3),
            "nan_recoveries": run.recoveries,
            "device": str(device),
            "precision": str(dtype or torch.float32).replace("torch.", ""),
            "optimizer": config.optimizer,
            "channels_last": channels_last,
            "loss_weights": [list(it.weights) for it in prepared],
            "config_digest": digest,
            "resumed_from_step": resume.step if resume is not None else None,
            # per scale, the fraction of the total and of each term removed by its last iteration
            # (items.removed_fractions; None for a scale finished before a resume)
            "loss_removed": run.removed,
            "loss_scale": run.scaler.scale if run.scaler is not None else None,  # fp16 only
        }
        return Result(images[0], images, meta, x.detach().float().cpu())


def _prepare(
    items: Sequence[BatchItem], config: TransferConfig, weights: Weights
) -> tuple[list[PreparedItem], list[Any]]:
    preset = config.loss_weights(weights.kind)
    prepared, parts = [], []
    for item in items:
        content = load_image(item.content)
        styles = [load_image(s) for s in (item.styles or [])]
        if not styles:
            raise EngineError("invalid_config", "give at least one style image")
        blend = normalise_blend(item.style_blend_weights or config.style_blend_weights, len(styles))
        w = item_loss_weights(item, preset)
        masks = load_masks(item.masks, len(styles), (content.height, content.width))
        p = prepare_item(pil_to_tensor(content), [pil_to_tensor(s) for s in styles], blend, w, config.color)
        prepared.append(replace(p, masks=None if masks is None else [m for m, _ in masks]))
        parts.append(
            [
                _hash(content),
                [_hash(s) for s in styles],
                blend,
                list(w),
                None if masks is None else [h for _, h in masks],
            ]
        )
    return prepared, parts


def load_masks(
    masks: Sequence[Any] | None, n_styles: int, content_hw: tuple[int, int]
) -> list[tuple[torch.Tensor, str]] | None:
    """Each mask as a (1, 1, h, w) luminance tensor in [0, 1], with its hash; refused
    (``invalid_mask``) unless there is one per style, each with the content's aspect ratio within
    MASK_ASPECT_TOLERANCE (the API applies the same rule from the uploads' headers)."""
    if masks is None:
        return None
    if len(masks) != n_styles:
        raise EngineError(
            "invalid_mask", f"{len(masks)} masks given for {n_styles} styles; give one mask per style"
        )
    out = []
    for k, source in enumerate(masks, start=1):
        im = load_image(source).convert("L")
        if abs(math.log((im.width / im.height) / (content_hw[1] / content_hw[0]))) > MASK_ASPECT_TOLERANCE:
            raise EngineError(
                "invalid_mask",
                f"mask {k} is {im.width}x{im.height} px, the content {content_hw[1]}x{content_hw[0]} "
                "px: a mask must have the content's aspect ratio",
            )
        arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float().div_(255)
        if not arr.any():
            raise EngineError(
                "invalid_mask",
                f"mask {k} is black everywhere: its style would apply "
                "nowhere; white marks where a style applies",
            )
        out.append((arr[None, None], _hash(im)))
    return out


# A mask may differ from its content's aspect ratio by 2 % (|log ratio|; it is resized to the content):
# the same rule as the API's (api/masks.py), which checks it from the upload's header.
MASK_ASPECT_TOLERANCE = 0.02


def _hw(t: torch.Tensor) -> tuple[int, int]:
    return int(t.shape[-2]), int(t.shape[-1])


def _hash(im: Image.Image) -> str:
    return hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()[:16]


def _batch_schedule(prepared: list[PreparedItem], config: TransferConfig) -> Schedule:
    schedules = [
        build_schedule(
            _hw(p.content),
            size=config.size,
            min_size=config.min_size,
            scale_factor=config.scale_factor,
            scales=config.scales,
            iterations=config.iterations,
            max_scales=config.max_scales,
            optimizer=config.optimizer,
        )
        for p in prepared
    ]
    for p, schedule in zip(prepared, schedules, strict=True):  # styles too small at some scale
        check_runnable(
            [hw for hw, _ in schedule],
            [_hw(s) for s in p.styles],
            config.style_scale,
            upscale=config.style_upscale,
        )
    if any(s != schedules[0] for s in schedules):
        sizes = sorted({str(s[-1][0]) for s in schedules})
        raise EngineError(
            "batch_shape_mismatch",
            f"batch items must have the same aspect ratio (output sizes {', '.join(sizes)}); "
            "run them as separate jobs",
        )
    return schedules[0]


def stylize(
    content: Any,
    styles: Any,
    config: TransferConfig | None = None,
    *,
    masks: Sequence[Any] | None = None,
    on_progress: ProgressFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    resume: Checkpoint | None = None,
    engine: StyleTransfer | None = None,
) -> Result:
    """One-shot stylisation; pass ``engine`` to reuse loaded models across calls."""
    config = config or TransferConfig()
    if engine is None:
        engine = StyleTransfer(config.weights or "imagenet", config.device or "auto", config.seed)
    return engine.run(
        content,
        styles,
        config,
        masks=masks,
        on_progress=on_progress,
        on_checkpoint=on_checkpoint,
        resume=resume,
    )
