"""The members of a GPU group (worker.batch) that run alone after it: one that could not go on in
the group, and each one when the group failed as a whole. Until its run alone starts a member keeps
its lease (its heartbeat goes on while the others run), and it runs from its checkpoints as
recorded then, not as claimed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sqlalchemy import update

from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.jobs import NODE, LoadJob, MakeJob
from worker import checkpoints, runner

from .batchkit import bucket_jobs, grouped, hand_back_at_step, heartbeats_go_on, resumes

__all__ = ["grouped"]  # the fixture


def _runs_alone(monkeypatch: pytest.MonkeyPatch, during_first: Any = None) -> list[str]:
    """The jobs run alone, in order; ``during_first()`` is called as the first of them starts."""
    runs: list[str] = []
    alone = runner._execute

    def count(claim: Any, settings: Settings, **kw: Any) -> str:
        runs.append(claim.job_id)
        if len(runs) == 1 and during_first is not None:
            during_first()
        return alone(claim, settings, **kw)

    monkeypatch.setattr(runner, "_execute", count)
    return runs


def test_a_member_whose_checkpoint_is_gone_runs_alone_afresh_and_keeps_its_lease(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import StyleTransfer

    jobs = bucket_jobs(make_job, 3)
    hand_back_at_step(monkeypatch, 4)
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    storage = open_storage(grouped)
    for ref in load_job(jobs[2]).checkpoints:
        storage.delete(ref["key"])
    groups = resumes(monkeypatch)
    run_group = StyleTransfer.run_group

    def beating(self: StyleTransfer, group: Any, config: Any, **kw: Any) -> Any:
        heartbeats_go_on(grouped, [jobs[2]])  # left out of the group, still held
        return run_group(self, group, config, **kw)

    monkeypatch.setattr(StyleTransfer, "run_group", beating)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    assert groups == [[4, 4]]  # the third could not start at scale 1 with the others
    sizes = [(load_job(j).status, (load_job(j).execution or {}).get("group_size")) for j in jobs]
    assert sizes == [("succeeded", 2), ("succeeded", 2), ("succeeded", 1)]
    assert [load_job(j).attempt for j in jobs] == [2, 2, 2]  # no lease ran out


def test_when_the_group_fails_as_a_whole_each_job_runs_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivered job runs alone first; the others keep their leases meanwhile."""
    from worker.engine import StyleTransfer

    def refuse(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", refuse)
    jobs = bucket_jobs(make_job, 3)
    missing = bucket_jobs(make_job, 1)[0]  # settled (failed) while the group was prepared: not run again
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == missing).values(style_image_ids=["f" * 64]))
        s.commit()
    runs = _runs_alone(monkeypatch, lambda: heartbeats_go_on(grouped, jobs[1:]))
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    for job_id in jobs:
        job = load_job(job_id)
        assert (job.status, job.attempt) == ("succeeded", 1)
        assert job.execution is not None and job.execution["group_size"] == 1
    assert (load_job(missing).status, load_job(missing).error_code) == ("failed", "input_missing")
    assert runs[0] == jobs[0] and sorted(runs) == sorted(jobs)  # each alone once; the failed one not at all


def test_after_a_late_group_failure_each_job_resumes_from_the_groups_checkpoints(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group recorded every member's checkpoints (to its last scale's end) and then failed: each
    run alone resumes from its latest, not from the list it was claimed with (none)."""
    from worker.engine import StyleTransfer

    run_group = StyleTransfer.run_group

    def fail_late(self: StyleTransfer, group: Any, config: Any, **kw: Any) -> Any:
        run_group(self, group, config, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", fail_late)
    steps: list[int] = []
    point = checkpoints.resume_point

    def resume_point(storage: Any, claim: Any) -> Any:
        found = point(storage, claim)
        steps.append(found[1])
        return found

    monkeypatch.setattr(runner, "resume_point", resume_point)
    jobs = bucket_jobs(make_job, 3)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    assert steps == [6, 6, 6]  # the runs alone: each from its own end-of-run checkpoint
    for job_id in jobs:
        job = load_job(job_id)
        assert (job.status, job.attempt) == ("succeeded", 1)
        assert job.progress["step"] == job.progress["total_steps"] == 6
