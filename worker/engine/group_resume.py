"""A group member's state in and out of the single-job checkpoint format (group.py).

Out: member b's checkpoint is the one a run of it alone would write at that point (a batch of one,
torch optimiser states), so it resumes alone. In: a group may hold members that resume from such a
checkpoint, written by a run alone or by any other group. They must all start at the same scale
(the caller groups them by it: the worker by ``jobs.resume_scale``); within that scale each member
goes on from its own iteration, with its own image, optimiser state, EMA, objective divisor, lr
and recovery count, and takes the iterations left to it. A member with fewer left than the others
ends the scale first and waits, masked out (its image frozen: a masked item neither steps nor
averages), until the scale ends for all; from the next scale on the members are in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .batched import BatchedAdam, BatchedLBFGS
from .checkpoint import Checkpoint
from .errors import EngineError
from .group_state import Member, ScaleRun
from .images import resize
from .optim import LBFGS_STATE_LIMIT_BYTES, resize_adam_state

if TYPE_CHECKING:
    from .group import GroupPyramid


def start_scale(ckpt: Checkpoint | None) -> int:
    """The scale a run resumed from ``ckpt`` starts at (Pyramid.run's rule)."""
    if ckpt is None:
        return 0
    return ckpt.scale + 1 if ckpt.end_of_scale else ckpt.scale


def first_scale(members: Sequence[Member], scales: int) -> int:
    """The one scale every member starts at; an error when they differ (grouped wrongly)."""
    starts = {start_scale(m.resume) for m in members}
    if len(starts) != 1:
        raise EngineError(
            "batch_shape_mismatch",
            f"the jobs of a group resume at different scales ({sorted(starts)}); group by resume scale",
        )
    first = starts.pop()
    if first >= scales:
        raise EngineError("batch_shape_mismatch", "a job that finished its last scale has nothing to run")
    return first


def resume_error(ckpt: Checkpoint, digest: str, channels: int) -> EngineError | None:
    """Why member's checkpoint cannot be resumed from (Pyramid.run's checks); None: it can."""
    if ckpt.config_digest != digest:
        return EngineError(
            "checkpoint_mismatch",
            "the checkpoint was made with a different configuration or different images; "
            "resume with the same settings and inputs, or start afresh",
        )
    image = ckpt.image if channels == 3 else ckpt.luminance
    if image is None or image.shape[1] != channels or image.shape[0] != 1:
        return EngineError("checkpoint_mismatch", "the checkpoint holds no image of this job to resume from")
    return None


def place(members: Sequence[Member], lrs: torch.Tensor, counts: torch.Tensor) -> None:
    """Each resumed member's step, iteration, lr and recoveries as its checkpoint left them."""
    for b, m in enumerate(members):
        if m.resume is None:
            continue
        ck = m.resume
        m.step, m.done = ck.step, 0 if ck.end_of_scale else ck.iteration
        lrs[b], counts[b] = ck.lr, ck.recoveries


def start_image(pyr: GroupPyramid, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W): the fresh members' start, each resumed member's image where it left off (a
    scale's end: its result upsampled, as Pyramid.run carries a scale to the next)."""
    x = pyr._init_image(hw)
    for b, m in enumerate(pyr.members):
        ck = m.resume
        if ck is None:
            continue
        image = ck.image if pyr.channels == 3 else ck.luminance
        assert image is not None  # resume_error() checked
        if ck.end_of_scale:
            x[b : b + 1] = resize(image, hw).to(x)
        else:  # mid-scale with an EMA: the optimiser's own x, not the average the image shows
            x[b : b + 1] = (ck.iterate if ck.iterate is not None else image).to(x)
    return x


def start_adam(pyr: GroupPyramid, x: torch.Tensor, hw: tuple[int, int]) -> BatchedAdam | None:
    """The first scale's Adam: each resumed member's moments (carried to a new scale only with
    carry_optimizer_state, as a single run's); None when no member brings any."""
    cfg = pyr.cfg
    if cfg.optimizer != "adam":
        return None
    adam, loaded = BatchedAdam(x, cfg.betas), False
    for b, m in enumerate(pyr.members):
        ck = m.resume
        state = None if ck is None else ck.optimizer_state
        if ck is not None and ck.end_of_scale:
            state = resize_adam_state(state, hw) if state is not None and cfg.carry_optimizer_state else None
        if state is not None:
            adam.load_item(b, state)
            loaded = True
    return adam if loaded else None


def load_mid_scale(members: Sequence[Member], run: ScaleRun) -> None:
    """The first scale's per-member state of a mid-scale resume: its L-BFGS history, its EMA and
    the objective's divisor (the others take theirs at their first finite evaluation)."""
    known, rows = [False] * len(members), [[1.0, 1.0, 1.0] for _ in members]
    for b, m in enumerate(members):
        ck = m.resume
        if ck is None or ck.end_of_scale:
            continue
        if isinstance(run.opt, BatchedLBFGS) and ck.optimizer_state is not None:
            run.opt.load_item(b, ck.optimizer_state)
        if run.avg is not None and ck.average is not None:
            run.avg.load_item(b, ck.average)
        if ck.loss_start is not None:
            rows[b], known[b] = list(ck.loss_start[0]), True
    if any(known):
        run.loss_fn.start = torch.tensor(rows, dtype=run.last.dtype, device=run.last.device)
        run.started |= torch.tensor(known, device=run.started.device)
        run.loss_fn.retake = ~run.started


def item_checkpoint(
    pyr: GroupPyramid,
    run: ScaleRun,
    b: int,
    x: torch.Tensor,
    at: tuple[int, int, bool],
    start: list[list[float]] | None,
    lr: float,
    recoveries: int,
) -> Checkpoint:
    """Member b's checkpoint in the single-job format (a batch of one); ``at``: its iteration,
    step and whether this ends its scale."""
    it, step, end = at
    result = run.avg.get()[b : b + 1] if run.avg is not None else x.detach()[b : b + 1]
    own = x.detach()[b : b + 1].float().cpu().clone()
    return Checkpoint(
        scale=run.s,
        iteration=it,
        step=step,
        image=pyr.finish_item(result, b).float().cpu().clone(),
        luminance=result.float().cpu().clone() if pyr.channels == 1 else None,
        optimizer_state=_opt_state(run, b, lr),
        config_digest=pyr.members[b].digest,
        end_of_scale=end,
        lr=lr,
        recoveries=recoveries,
        loss_start=start,
        iterate=own if run.avg is not None else None,
        average=run.avg.item_state(b) if run.avg is not None else None,
    )


def _opt_state(run: ScaleRun, b: int, lr: float) -> dict[str, Any] | None:
    if isinstance(run.opt, BatchedAdam):
        return run.opt.item_state(b, lr)
    held = int(run.opt.count[b])
    if 2 * held * run.opt.d[b].numel() * run.opt.d.element_size() > LBFGS_STATE_LIMIT_BYTES:
        return None  # as a single run: too big to checkpoint, the resumed L-BFGS starts afresh
    return run.opt.item_state(b, lr, loss=0.0)  # prev_loss feeds a tolerance test that is off


__all__ = [
    "first_scale",
    "item_checkpoint",
    "load_mid_scale",
    "place",
    "resume_error",
    "start_adam",
    "start_image",
    "start_scale",
]
