"""Public entry points: StyleTransfer (models cached for reuse across jobs) and stylize()."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .checkpoint import Checkpoint
from .config import BatchItem, TransferConfig
from .errors import EngineError
from .images import tensor_to_pil
from .inputs import batch_schedule, prepare_items, shrink_inputs
from .losses import autocast, fast_cuda_math
from .progress import Progress
from .pyramid import Pyramid
from .schedule import Schedule
from .vgg import AVG_POOL_SCALE, LAYER_INDEX, ModelKey, VGGFeatures, build_features, layer_index
from .weights import Weights, resolve_weights

if TYPE_CHECKING:
    from .groups import GroupJob, GroupOutcome

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
        if device.type == "cuda":
            fast_cuda_math()
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

    def run_group(self, jobs: Sequence[GroupJob], config: TransferConfig, **kw: Any) -> list[GroupOutcome]:
        """Independent jobs of one shape as one batch, each settled alone (groups.run_group)."""
        from .groups import run_group

        return run_group(self, jobs, config, **kw)

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
        prepared, digest_parts = prepare_items(items, config, weights)
        schedule = batch_schedule(prepared, config)
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
            **run_facts(weights, schedule, run.step, device, dtype, config.optimizer),
            "seed": config.seed,
            "seconds": round(time.perf_counter() - t0, 3),
            "nan_recoveries": run.recoveries,
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


def run_facts(
    weights: Weights,
    schedule: Schedule,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None,
    optimizer: str,
) -> dict[str, Any]:
    """What a result's metadata says about how it was made, for single runs and groups alike."""
    return {
        "weights_kind": weights.kind,
        "weights_source": weights.source,
        "random_weights": weights.kind == "random",
        "scales": [list(hw) for hw, _ in schedule],
        "iterations": [n for _, n in schedule],
        "steps": steps,
        "device": str(device),
        "precision": str(dtype or torch.float32).replace("torch.", ""),
        "optimizer": optimizer,
    }


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
