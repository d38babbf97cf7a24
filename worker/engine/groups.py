"""``run_group``: several independent jobs that share a schedule, as one batch on one device.

The caller (the worker's batch path) has grouped jobs whose configurations agree on everything that
shapes the computation: the schedule (per-scale sizes and iterations; so their contents share an
aspect ratio), the optimiser and its settings, layers, pooling, precision and weights. What may
differ per job is in its ``GroupJob``: images and blends, loss weights (on the ``BatchItem``), seed,
its callbacks, and the single-job checkpoint it resumes from (``resume``: the members of a group start
at one scale, group_resume.py). Each job comes back as its own ``GroupOutcome``: a result, or the
error that ended it (an ``EngineError``, or whatever its own callback raised, such as the worker's
stop signal). A callback that raises ``GroupAborted`` ends the whole group: ``run_group`` raises it.
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
from .group_resume import resume_error
from .group_state import Member, members_for
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
    # a checkpoint of this job (made alone or in a group) to go on from; one that does not match
    # the job ends it with ``checkpoint_mismatch`` before the group runs (the others run on)
    resume: Checkpoint | None = None


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
    lbfgs_solved: bool = False,
) -> list[GroupOutcome]:
    """Run ``jobs`` as one batch; one outcome per job, in order. Raises (for the whole group) only
    what no job could run with: an invalid config, no device, unloadable weights, jobs that do not
    share a schedule (``batch_shape_mismatch``: the caller grouped them wrongly). ``lbfgs_solved``:
    L-BFGS directions in the solved form (batched_lbfgs.py)."""
    from .transfer import resolve_device, resolve_precision

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
        [j.seed for j in jobs],
        digests,
        [j.on_progress for j in jobs],
        [j.on_checkpoint for j in jobs],
        [j.resume for j in jobs],
    )
    channels = 1 if config.color == "luminance" else 3
    for m in members:
        m.error = resume_error(m.resume, m.digest, channels) if m.resume is not None else None
    running = [i for i, m in enumerate(members) if m.error is None]
    if not running:  # every checkpoint was refused
        return [GroupOutcome(error=m.error, metadata={"group_size": len(jobs)}) for m in members]
    every = report_every or (DEFAULT_REPORT_EVERY_CUDA if device.type == "cuda" else 1)
    run = GroupPyramid(
        model,
        [prepared[i] for i in running],
        config,
        schedule,
        device=device,
        cast=lambda: autocast(device, dtype),
        channels_last=channels_last,
        digest=digests[running[0]],
        loss_scaling=dtype == torch.float16,
        members=[members[i] for i in running],
        report_every=every,
        lbfgs_solved=lbfgs_solved,
    )
    run.run_group()
    seconds = round(time.perf_counter() - t0, 3)
    group = {"group_size": len(jobs), "seconds": seconds, "device": str(device)}
    facts = {"device": device, "dtype": dtype, "weights": weights, "optimizer": config.optimizer}
    outcomes = _outcomes(members, run.results, schedule, group, facts)
    logger.info("group of %d on %s: %d ended, %.2f s", len(jobs), device, len(run.results), seconds)
    return outcomes


def _outcomes(
    members: list[Member],
    results: dict[int, torch.Tensor],
    schedule: Any,
    group: dict[str, Any],
    facts: dict[str, Any],
) -> list[GroupOutcome]:
    """One outcome per member: its result (with its run's facts), or the error that ended it."""
    from .transfer import Result, run_facts

    outcomes = []
    for m in members:
        if m.error is not None or m.index not in results:
            error = m.error or EngineError("internal_error", "the group ended without this job's result")
            outcomes.append(GroupOutcome(error=error, metadata=group))
            continue
        x = results[m.index].float().cpu()
        f = facts
        meta = {
            **run_facts(f["weights"], schedule, m.step, f["device"], f["dtype"], f["optimizer"]),
            "seed": m.seed,
            "config_digest": m.digest,
            "resumed_from_step": m.resume.step if m.resume is not None else None,
            **group,
        }
        image = tensor_to_pil(x[0])
        outcomes.append(GroupOutcome(Result(image, [image], meta, x), None, group))
    return outcomes


__all__ = ["DEFAULT_REPORT_EVERY_CUDA", "GroupJob", "GroupOutcome", "run_group"]
