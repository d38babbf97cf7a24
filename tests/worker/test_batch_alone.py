"""The members of a GPU group (worker.batch) that go back to run alone: one that could not go on in
the group, and each one when the group failed as a whole. Until it is given back a member keeps its
lease (its heartbeat goes on while the group runs); it goes back with no attempt used and its bucket
cleared (never into a group again), the delivered job with a new message, and its run alone resumes
from its latest checkpoint, the group's included."""

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

from .batchkit import bucket_jobs, grouped, hand_back_at_step, heartbeats_go_on, republished, resumes

__all__ = ["grouped"]  # the fixture


def _given_back_alone(load_job: LoadJob, job_id: str, attempt: int) -> bool:
    job = load_job(job_id)
    return (job.status, job.bucket, job.attempt, job.worker) == ("queued", None, attempt, None)


def _runs_alone(load_job: LoadJob, grouped: Settings, job_id: str) -> int | None:
    """Deliver the job (as the dispatcher does) once it was given back: its group size."""
    assert runner.run_job(job_id, NODE, grouped) == "succeeded"
    return (load_job(job_id).execution or {}).get("group_size")


def test_a_member_whose_checkpoint_is_gone_keeps_its_lease_then_runs_alone_afresh(
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
    assert [(load_job(j).status, (load_job(j).execution or {}).get("group_size")) for j in jobs[:2]] == [
        ("succeeded", 2)
    ] * 2
    third = load_job(jobs[2])
    assert _given_back_alone(load_job, jobs[2], 2) and third.published_at is None  # waiting
    assert third.max_attempts == 5  # two hand-backs, no attempt used
    assert _runs_alone(load_job, grouped, jobs[2]) == 1


def test_when_the_group_fails_as_a_whole_each_job_goes_back_to_run_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import StyleTransfer

    def refuse(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", refuse)
    published = republished(monkeypatch)
    jobs = bucket_jobs(make_job, 3)
    missing = bucket_jobs(make_job, 1)[0]  # settled (failed) while the group was prepared
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == missing).values(style_image_ids=["f" * 64]))
        s.commit()
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    assert all(_given_back_alone(load_job, j, 1) for j in jobs)
    assert published == [jobs[0]]  # the delivered job's new message; the others wait for the dispatcher
    assert [load_job(j).published_at is None for j in jobs] == [False, True, True]
    assert (load_job(missing).status, load_job(missing).error_code) == ("failed", "input_missing")
    assert [_runs_alone(load_job, grouped, j) for j in jobs] == [1, 1, 1]
    assert [load_job(j).attempt for j in jobs] == [2, 2, 2]


def test_after_a_late_group_failure_each_job_resumes_from_the_groups_checkpoints(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group recorded every member's checkpoints (to its last scale's end) and then failed: each
    run alone resumes from its latest, with nothing left to run."""
    from worker.engine import StyleTransfer

    run_group = StyleTransfer.run_group

    def fail_late(self: StyleTransfer, group: Any, config: Any, **kw: Any) -> Any:
        run_group(self, group, config, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", fail_late)
    republished(monkeypatch)
    steps: list[int] = []
    point = checkpoints.resume_point

    def resume_point(storage: Any, claim: Any) -> Any:
        found = point(storage, claim)
        steps.append(found[1])
        return found

    monkeypatch.setattr(runner, "resume_point", resume_point)
    jobs = bucket_jobs(make_job, 3)
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    assert [_runs_alone(load_job, grouped, j) for j in jobs] == [1, 1, 1]
    assert steps == [6, 6, 6]  # each from its own end-of-run checkpoint
    for job_id in jobs:
        progress = load_job(job_id).progress
        assert progress["step"] == progress["total_steps"] == 6 and progress["fraction"] == 1.0
