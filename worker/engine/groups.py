"""``run_group``: several independent jobs that share a schedule, as one batch on one device.

The caller (the worker's batch path) has grouped jobs whose configurations agree on everything that
shapes the computation: the schedule (per-scale sizes and iterations; so their contents share an
aspect ratio), the optimiser and its settings, layers, pooling, precision and weights. What may
differ per job is in its ``GroupJob``: images and blends, loss weights (on the ``BatchItem``), seed,
and its callbacks. Each job comes back as its own ``GroupOutcome``: a result, or the error that ended
it (an ``EngineError``, or whatever its own callback raised, such as the worker's stop signal).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import Checkpoint
from .config import BatchItem, TransferConfig
from .errors import EngineError
from .group import GroupPyramid
from .group_state import members_for
from .images import tensor_to_pil
from .inputs import batch_schedule, prepare_items, shrink_inputs
from .losses import autocast
from .progress import Progress
from .vgg import layer_index

if TYPE_CHECKING:
    from .transfer import Result, StyleTransfer

logger = logging.getLogger(__name__)

DEFAULT_REPORT_EVERY_CUDA = 10  # host reads per iteration on CUDA: 1 in 10 (no sync in between)


@dataclass
class GroupJob:
    item: BatchItem
    seed: int = 0  # this job's seed (noise init); the config's seed is not used
    on_progress: Callable[[Progress], Any] | None = None
    on_checkpoint: Callable[[Checkpoint], Any] | None = None
    # the job's own config, as a run of it alone has it (its per-item values set): its digest names
    # its checkpoints, so they resume alone; None: the group's config with this seed
    config: TransferConfig | None = None


@dataclass
class GroupOutcome:
    result: Result | None = None
    error: BaseException | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # group-level facts (size, seconds)


def run_group(
    engine: StyleTransfer,
    jobs: Sequence[GroupJob],
    config: TransferConfig,
    *,
    report_every: int | None = None,
) -> list[GroupOutcome]:
    """Run ``jobs`` as one batch; one outcome per job, in order. Raises (for the whole group) only
    what no job could run with: an invalid config, no device, unloadable weights, jobs that do not
    share a schedule (``batch_shape_mismatch``: the caller grouped them wrongly)."""
    from .transfer import Result, resolve_device, resolve_precision, run_facts

    if not jobs:
        return []
    t0 = time.perf_counter()
    spec = config.weights or engine.weights
    weights = engine.load_weights(spec)
    device = resolve_device(config.device or engine.device)
    dtype = resolve_precision(config.precision, device)
    prepared, parts = prepare_items([j.item for j in jobs], config, weights)
    schedule = batch_schedule(prepared, config)
    prepared = shrink_inputs(prepared, schedule, config.style_scale, config.style_upscale)
    layers = [layer_index(n) for n in (*config.content_layers, *config.style_layers)]
    model = engine.model(spec, device, config.pooling, max(layers), pad_replicate=config.pad_replicate)
    channels_last = config.channels_last if config.channels_last is not None else True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # each job's digest is the one a run of it alone computes, so its checkpoints resume alone
    digests = [
        (j.config or replace(config, seed=j.seed)).digest([spec, weights.kind, [p]])
        for j, p in zip(jobs, parts, strict=True)
    ]
    members = members_for(
        [j.seed for j in jobs], digests, [j.on_progress for j in jobs], [j.on_checkpoint for j in jobs]
    )
    every = report_every or (DEFAULT_REPORT_EVERY_CUDA if device.type == "cuda" else 1)
    run = GroupPyramid(
        model,
        prepared,
        config,
        schedule,
        device=device,
        cast=lambda: autocast(device, dtype),
        channels_last=channels_last,
        digest=digests[0],
        loss_scaling=dtype == torch.float16,
        members=members,
        report_every=every,
    )
    run.run_group()
    seconds = round(time.perf_counter() - t0, 3)
    group = {"group_size": len(jobs), "seconds": seconds, "device": str(device)}
    outcomes = []
    for i, member in enumerate(members):
        if member.error is not None or i not in run.results:
            error = member.error or EngineError("internal_error", "the group ended without this job's result")
            outcomes.append(GroupOutcome(error=error, metadata=group))
            continue
        x = run.results[i].float().cpu()
        meta = {
            **run_facts(weights, schedule, run.step, device, dtype, config.optimizer),
            "seed": member.seed,
            "config_digest": member.digest,
            **group,
        }
        image = tensor_to_pil(x[0])
        outcomes.append(GroupOutcome(Result(image, [image], meta, x), None, group))
    logger.info("group of %d on %s: %d ended, %.2f s", len(jobs), device, len(run.results), seconds)
    return outcomes


__all__ = ["DEFAULT_REPORT_EVERY_CUDA", "GroupJob", "GroupOutcome", "run_group"]
