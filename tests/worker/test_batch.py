"""A GPU worker's group (worker.batch) with the real engine on CPU (random weights, 32 px), SQLite and
folder storage, STYLEQUEUE_BATCH_MAX=4: the delivered job takes waiting jobs of its bucket, and every
member is settled on its own (result, cancel, bad input), with the execution recorded."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from shared.buckets import bucket_key
from shared.db import get_sessionmaker
from shared.dispatch import Among
from shared.models import Job, StoredImage
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.images import png, png_bytes
from tests.support.jobs import CONTENT, NODE, STYLE, LoadJob, MakeJob
from worker import batch, runner, settle
from worker.watcher import StopReason, Watcher

PARAMS = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 3}
BUCKET = bucket_key(JobParams(**PARAMS), (48, 48))  # the conftest's images are 48 x 48


@pytest.fixture
def grouped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Batching on (4 per group) with the real engine; the inputs in storage; no dispatch pass."""
    storage = open_storage(settings)
    storage.put_bytes(f"images/{CONTENT}", png())
    storage.put_bytes(f"images/{STYLE}", png((255, 200, 0)))
    monkeypatch.setattr(runner, "refill", lambda _settings: None)
    return settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 0})


def _jobs(make_job: MakeJob, n: int, **fields: Any) -> list[str]:
    fields.setdefault("bucket", BUCKET)
    fields.setdefault("params", PARAMS)
    return [make_job(**fields) for _ in range(n)]


def test_the_delivered_job_runs_with_the_waiting_jobs_of_its_bucket(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    first, *mates = _jobs(make_job, 4)
    other = make_job(bucket="another-bucket", params=PARAMS)
    too_many = _jobs(make_job, 1)  # a fifth of the bucket: the group holds 4
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    for job_id in (first, *mates):
        job = load_job(job_id)
        assert (job.status, job.attempt) == ("succeeded", 1), job.error_message
        assert job.execution is not None and job.execution["group_size"] == 4
        assert job.execution["device"] == "cpu" and job.execution["random_weights"] is True
        assert open_storage(grouped).exists(job.result_key or "")
    assert load_job(other).status == "queued" and load_job(too_many[0]).status == "queued"


def test_per_item_values_differ_within_a_group(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    first = _jobs(make_job, 1)[0]
    heavy = _jobs(make_job, 1, params={**PARAMS, "style_weight": 50.0, "seed": 3})[0]
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    assert load_job(heavy).status == "succeeded"
    results = [open_storage(grouped).get_bytes(load_job(j).result_key or "") for j in (first, heavy)]
    assert results[0] != results[1]


def test_a_canceled_member_stops_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, victim, third = _jobs(make_job, 3)
    seen = Watcher.on_progress

    def on_progress(self: Watcher, p: Any) -> str | None:
        if self.job_id == victim and p.step >= 2:
            self.stop = StopReason.CANCELED  # what its watcher thread sets on seeing the request
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    assert [load_job(j).status for j in (first, victim, third)] == ["succeeded", "canceled", "succeeded"]


def test_a_member_with_bad_input_fails_alone(grouped: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    first = _jobs(make_job, 1)[0]
    missing = _jobs(make_job, 1)[0]
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == missing).values(style_image_ids=["f" * 64]))
        s.commit()
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    job = load_job(missing)
    assert (job.status, job.error_code) == ("failed", "input_missing")


def test_a_job_that_resumes_at_another_scale_is_not_taken_into_the_group(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    first = _jobs(make_job, 1)[0]
    ref = {"key": "jobs/x/checkpoints/3.pt", "scale": 0, "iteration": 3, "step": 3, "end_of_scale": True}
    resumable = _jobs(make_job, 1, checkpoints=[ref], resume_scale=1)[0]
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    job = load_job(first)
    assert job.execution is not None and job.execution["group_size"] == 1  # it ran alone
    resumed = load_job(resumable)
    assert (resumed.status, resumed.published_at) == ("queued", None)  # waiting, no attempt used


def _hand_back_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Each job's first attempt stops at ``step`` as on a worker's shutdown: it checkpoints, then
    is handed back; the jobs published again (no broker here)."""
    published: list[str] = []
    monkeypatch.setattr(settle, "publish_job", lambda _app, job_id: published.append(job_id))
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    stopped: set[str] = set()
    seen = Watcher.on_progress

    def on_progress(self: Watcher, p: Any) -> str | None:
        if p.step >= step and self.job_id not in stopped:
            stopped.add(self.job_id)
            self.stop = StopReason.SHUTDOWN
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)
    return published


def _resumes(monkeypatch: pytest.MonkeyPatch) -> list[list[int | None]]:
    """The step each member of each group resumes from (None: fresh)."""
    from worker.engine import StyleTransfer

    groups: list[list[int | None]] = []
    run_group = StyleTransfer.run_group

    def spy(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        groups.append([j.resume.step if j.resume is not None else None for j in jobs])
        return run_group(self, jobs, config, **kw)

    monkeypatch.setattr(StyleTransfer, "run_group", spy)
    return groups


def test_jobs_handed_back_mid_group_resume_together_in_a_group(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at scale 1, iteration 1 (step 4) by a shutdown, the three regroup at scale 1 from their
    own checkpoints when the delivered one comes back; a fresh job of the bucket waits (it starts
    at scale 0)."""
    jobs = _jobs(make_job, 3)
    published = _hand_back_at_step(monkeypatch, 4)
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    assert [(load_job(j).status, load_job(j).resume_scale) for j in jobs] == [("queued", 1)] * 3
    assert published == [jobs[0]]  # a new message for the delivered job; the others wait for it
    assert [load_job(j).published_at is None for j in jobs] == [False, True, True]
    fresh = _jobs(make_job, 1)[0]
    groups = _resumes(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    assert groups == [[4, 4, 4]]
    for job_id in jobs:
        job = load_job(job_id)
        assert job.status == "succeeded" and job.execution is not None and job.execution["group_size"] == 3
        assert job.progress["step"] == job.progress["total_steps"] == 6
    assert load_job(fresh).status == "queued"


def test_a_member_whose_checkpoint_is_gone_runs_alone_afresh(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _jobs(make_job, 3)
    _hand_back_at_step(monkeypatch, 4)
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    storage = open_storage(grouped)
    for ref in load_job(jobs[2]).checkpoints:
        storage.delete(ref["key"])
    groups = _resumes(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    assert groups == [[4, 4]]  # the third could not start at scale 1 with the others
    sizes = [(load_job(j).status, (load_job(j).execution or {}).get("group_size")) for j in jobs]
    assert sizes == [("succeeded", 2), ("succeeded", 2), ("succeeded", 1)]


@pytest.mark.parametrize(
    ("device", "batch_max", "expected"), [("cpu", None, 1), ("cuda:0", None, 16), ("cpu", 4, 4)]
)
def test_the_batch_limit(
    settings_factory: Callable[..., Settings], device: str, batch_max: int | None, expected: int
) -> None:
    assert batch.batch_limit(settings_factory(device=device, batch_max=batch_max)) == expected


def test_when_the_group_fails_as_a_whole_each_job_runs_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import StyleTransfer

    def refuse(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", refuse)
    jobs = _jobs(make_job, 3)
    missing = _jobs(make_job, 1)[0]  # settled (failed) while the group was prepared: not run again
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == missing).values(style_image_ids=["f" * 64]))
        s.commit()
    runs = []
    alone = runner._execute

    def count(claim: Any, settings: Settings) -> str:
        runs.append(claim.job_id)
        return alone(claim, settings)

    monkeypatch.setattr(runner, "_execute", count)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    for job_id in jobs:
        job = load_job(job_id)
        assert (job.status, job.attempt) == ("succeeded", 1)
        assert job.execution is not None and job.execution["group_size"] == 1
    assert (load_job(missing).status, load_job(missing).error_code) == ("failed", "input_missing")
    assert sorted(runs) == sorted(jobs)  # each alone once; the failed one not at all


def test_a_time_limit_ends_every_member(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import StyleTransfer

    def too_long(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(StyleTransfer, "run_group", too_long)
    jobs = _jobs(make_job, 3)
    assert runner.run_job(jobs[0], NODE, grouped) == "failed"
    assert {(load_job(j).status, load_job(j).error_code) for j in jobs} == {("failed", "time_limit")}


def test_a_database_outage_while_filling_the_group_gives_every_job_back(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, mate, third = _jobs(make_job, 3)
    real = batch._take_waiting
    calls = {"n": 0}

    def flaky(settings: Settings, among: Among, count: int) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            return real(settings, among, 1)  # one mate taken, then the database goes away
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(batch, "_take_waiting", flaky)
    with pytest.raises(OperationalError):  # its Celery task retries it
        runner.run_job(first, NODE, grouped.model_copy(update={"batch_wait_ms": 60_000}))
    delivered, taken, untouched = load_job(first), load_job(mate), load_job(third)
    assert (delivered.status, delivered.max_attempts) == ("queued", 4)  # no attempt used up
    assert delivered.published_at is not None  # its retry message is due
    assert (taken.status, taken.published_at, taken.max_attempts) == ("queued", None, 4)  # waiting again
    assert (untouched.status, untouched.attempt) == ("queued", 0)


@pytest.mark.parametrize("exact", [False, True])
def test_a_nearly_square_content_runs_square_and_comes_back_at_its_own_aspect(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch, exact: bool
) -> None:
    """49 x 48 is within 3 % of 1:1: it runs as 49 x 49 (so it can share a bucket with square
    contents) and its result is resized back to 49:48; ``exact_aspect`` runs it as it is."""
    from worker.engine import StyleTransfer

    image_id = "a" * 64
    open_storage(grouped).put_bytes(f"images/{image_id}", png_bytes(7, 49, 48))
    with get_sessionmaker(grouped.database_url)() as s:
        s.add(
            StoredImage(
                id=image_id, format="PNG", width=49, height=48, bytes=1, storage_key=f"images/{image_id}"
            )
        )
        s.commit()
    seen: list[tuple[int, int]] = []
    run = StyleTransfer.run

    def spy(self: StyleTransfer, content: Any, *args: Any, **kw: Any) -> Any:
        seen.append(content.size)
        return run(self, content, *args, **kw)

    monkeypatch.setattr(StyleTransfer, "run", spy)
    job_id = make_job(params={**PARAMS, "exact_aspect": exact})
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(content_image_id=image_id))
        s.commit()
    assert runner.run_job(job_id, NODE, grouped) == "succeeded"
    assert seen == [(49, 48) if exact else (49, 49)]
    result = Image.open(io.BytesIO(open_storage(grouped).get_bytes(load_job(job_id).result_key or "")))
    assert result.size == (32, 31)  # 49:48 at the 32 px long edge, either way
