"""Resuming into a group (engine.group_resume): a job checkpointed alone or in a group goes on inside
another group from where it stopped, and ends as its uninterrupted run alone does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worker.engine import Checkpoint, EngineError, Progress, StyleTransfer, TransferConfig
from worker.engine.groups import GroupJob, run_group

from .conftest import small_config
from .groupkit import alone, gap, jobs, ok

__all__ = ["jobs"]  # the fixture


def _checkpoints(
    engine: StyleTransfer, job: GroupJob, cfg: TransferConfig
) -> dict[tuple[int, int], Checkpoint]:
    """The job's checkpoints of a run alone, by (scale, iteration), through their bytes."""
    saved: list[Checkpoint] = []
    alone(engine, job, replace(cfg, save_every=1), on_checkpoint=saved.append)
    return {(c.scale, c.iteration): Checkpoint.from_bytes(c.to_bytes()) for c in saved}


@pytest.mark.parametrize(
    ("optimizer", "ema", "tolerance"),
    [("adam", 0.99, 1e-5), ("adam", 0.0, 1e-5), ("lbfgs", 0.0, 1e-4)],  # L-BFGS amplifies rounding
)
def test_a_job_checkpointed_alone_resumes_mid_scale_inside_a_group(
    engine: StyleTransfer, jobs: list[GroupJob], optimizer: str, ema: float, tolerance: float
) -> None:
    """Job 1 resumes at scale 0, iteration 2 beside two fresh jobs: it takes the 2 iterations left
    to it, waits out the others' last 2, then goes on in step with them; it ends as its
    uninterrupted run alone, and the others as in a group of fresh jobs, bit for bit."""
    cfg = small_config(optimizer=optimizer, ema_decay=ema)
    ckpt = _checkpoints(engine, jobs[1], cfg)[(0, 2)]
    seen: list[Progress] = []
    saved: list[Checkpoint] = []
    resumed = replace(jobs[1], resume=ckpt, on_progress=seen.append, on_checkpoint=saved.append)
    outcomes = run_group(engine, [jobs[0], resumed, jobs[2]], replace(cfg, save_every=2))
    fresh = run_group(engine, jobs, cfg)
    for i in (0, 2):
        assert torch.equal(ok(outcomes[i]), ok(fresh[i]))
    assert gap(ok(outcomes[1]), alone(engine, jobs[1], cfg).tensor) < tolerance
    assert [(p.scale, p.iteration, p.step, p.waiting) for p in seen] == [
        (0, 3, 3, False),
        (0, 4, 4, False),
        (0, 4, 4, True),  # it waits out the others' last 2 iterations, told at each read
        (0, 4, 4, True),
        *[(1, i, 4 + i, False) for i in range(1, 5)],
    ]
    assert [(c.scale, c.iteration, c.step, c.end_of_scale) for c in saved] == [
        (0, 4, 4, True),
        (1, 2, 6, False),
        (1, 4, 8, True),
    ]
    result = outcomes[1].result
    assert result is not None and result.metadata["resumed_from_step"] == 2
    assert result.metadata["steps"] == 8


def test_a_job_that_waits_for_the_others_is_stopped_while_it_waits(
    engine: StyleTransfer, jobs: list[GroupJob]
) -> None:
    """Job 1 ends scale 0 two iterations before the others: a cancel seen while it waits ends it
    then (not at the next scale); the others end as in a group of fresh jobs."""
    cfg = small_config(optimizer="adam")
    seen: list[Progress] = []

    def cancel_while_waiting(p: Progress) -> None:
        seen.append(p)
        if p.waiting:
            raise RuntimeError("canceled")  # what the worker's callback raises (JobStopped)

    ckpt = _checkpoints(engine, jobs[1], cfg)[(0, 2)]
    resumed = replace(jobs[1], resume=ckpt, on_progress=cancel_while_waiting)
    outcomes = run_group(engine, [jobs[0], resumed, jobs[2]], cfg)
    assert isinstance(outcomes[1].error, RuntimeError)
    assert [(p.iteration, p.waiting) for p in seen] == [(3, False), (4, False), (4, True)]
    fresh = run_group(engine, [jobs[0], jobs[2]], cfg)
    assert torch.equal(ok(outcomes[0]), ok(fresh[0])) and torch.equal(ok(outcomes[2]), ok(fresh[1]))


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_jobs_checkpointed_in_one_group_resume_in_another_exactly(
    engine: StyleTransfer, jobs: list[GroupJob], optimizer: str
) -> None:
    """Checkpoints of a group of three, at scale 0's end and at scale 1's iteration 3, resumed in a
    new group of two: each ends bit for bit as in the uninterrupted group (items do not interact)."""
    cfg = small_config(optimizer=optimizer, init="noise")
    saved: list[list[Checkpoint]] = [[] for _ in jobs]
    group = [replace(j, on_checkpoint=saved[i].append) for i, j in enumerate(jobs)]
    whole = run_group(engine, group, replace(cfg, save_every=1))
    at = {i: {(c.scale, c.iteration): Checkpoint.from_bytes(c.to_bytes()) for c in saved[i]} for i in (0, 2)}
    again = [replace(jobs[0], resume=at[0][(0, 4)]), replace(jobs[2], resume=at[2][(1, 3)])]
    outcomes = run_group(engine, again, cfg)
    assert torch.equal(ok(outcomes[0]), ok(whole[0])) and torch.equal(ok(outcomes[1]), ok(whole[2]))


def test_a_checkpoint_of_another_job_ends_that_job_alone(engine: StyleTransfer, jobs: list[GroupJob]) -> None:
    cfg = small_config(optimizer="adam", init="noise")
    foreign = _checkpoints(engine, jobs[0], cfg)[(0, 2)]  # job 0's, handed to job 1
    clean = run_group(engine, [jobs[0], jobs[2]], cfg)
    outcomes = run_group(engine, [jobs[0], replace(jobs[1], resume=foreign), jobs[2]], cfg)
    assert isinstance(outcomes[1].error, EngineError) and outcomes[1].error.code == "checkpoint_mismatch"
    assert torch.equal(ok(outcomes[0]), ok(clean[0])) and torch.equal(ok(outcomes[2]), ok(clean[1]))


def test_jobs_that_resume_at_different_scales_cannot_be_grouped(
    engine: StyleTransfer, jobs: list[GroupJob]
) -> None:
    cfg = small_config(optimizer="adam")
    later = _checkpoints(engine, jobs[1], cfg)[(1, 1)]
    with pytest.raises(EngineError) as err:
        run_group(engine, [jobs[0], replace(jobs[1], resume=later)], cfg)
    assert err.value.code == "batch_shape_mismatch"


def test_resuming_leaves_the_checkpoint_as_it_was(engine: StyleTransfer, jobs: list[GroupJob]) -> None:
    """torch's load_state_dict keeps the tensors it is given and L-BFGS steps them in place: a
    resume must copy them, so one checkpoint can start a run alone and then a group (a retry)."""
    cfg = small_config(optimizer="lbfgs")
    ckpt = _checkpoints(engine, jobs[1], cfg)[(0, 2)]
    before = ckpt.to_bytes()
    alone(engine, jobs[1], cfg, resume=ckpt)
    run_group(engine, [replace(jobs[1], resume=ckpt)], cfg)
    assert ckpt.to_bytes() == before
