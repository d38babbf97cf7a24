"""A GPU worker's group (worker.batch) with the real engine on CPU (random weights, 32 px), SQLite and
folder storage, STYLEQUEUE_BATCH_MAX=4: the delivered job takes waiting jobs of its bucket, and every
member is settled on its own (result, cancel, bad input), with the execution recorded."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from shared.db import get_sessionmaker
from shared.dispatch import Among
from shared.models import Job, StoredImage
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.images import png_bytes
from tests.support.jobs import NODE, LoadJob, MakeJob
from worker import batch, jobstore, runner
from worker.watcher import StopReason, Watcher

from .batchkit import PARAMS, bucket_jobs, grouped, hand_back_at_step, resumes

__all__ = ["grouped"]  # the fixture


def test_the_delivered_job_runs_with_the_waiting_jobs_of_its_bucket(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    first, *mates = bucket_jobs(make_job, 4)
    other = make_job(bucket="another-bucket", params=PARAMS)
    too_many = bucket_jobs(make_job, 1)  # a fifth of the bucket: the group holds 4
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
    first = bucket_jobs(make_job, 1)[0]
    heavy = bucket_jobs(make_job, 1, params={**PARAMS, "style_weight": 50.0, "seed": 3})[0]
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    assert load_job(heavy).status == "succeeded"
    results = [open_storage(grouped).get_bytes(load_job(j).result_key or "") for j in (first, heavy)]
    assert results[0] != results[1]


def test_a_canceled_member_stops_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, victim, third = bucket_jobs(make_job, 3)
    seen = Watcher.on_progress

    def on_progress(self: Watcher, p: Any) -> str | None:
        if self.job_id == victim and p.step >= 2:
            self.stop = StopReason.CANCELED  # what its watcher thread sets on seeing the request
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    assert [load_job(j).status for j in (first, victim, third)] == ["succeeded", "canceled", "succeeded"]


def test_a_member_with_bad_input_fails_alone(grouped: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    first = bucket_jobs(make_job, 1)[0]
    missing = bucket_jobs(make_job, 1)[0]
    with get_sessionmaker(grouped.database_url)() as s:
        s.execute(update(Job).where(Job.id == missing).values(style_image_ids=["f" * 64]))
        s.commit()
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    job = load_job(missing)
    assert (job.status, job.error_code) == ("failed", "input_missing")


def test_a_job_that_resumes_at_another_scale_is_not_taken_into_the_group(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    first = bucket_jobs(make_job, 1)[0]
    ref = {"key": "jobs/x/checkpoints/3.pt", "scale": 0, "iteration": 3, "step": 3, "end_of_scale": True}
    resumable = bucket_jobs(make_job, 1, checkpoints=[ref], resume_scale=1)[0]
    assert runner.run_job(first, NODE, grouped) == "succeeded"
    job = load_job(first)
    assert job.execution is not None and job.execution["group_size"] == 1  # it ran alone
    resumed = load_job(resumable)
    assert (resumed.status, resumed.published_at) == ("queued", None)  # waiting, no attempt used


def test_jobs_handed_back_mid_group_resume_together_in_a_group(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at scale 1, iteration 1 (step 4) by a shutdown, the three regroup at scale 1 from their
    own checkpoints when the delivered one comes back; a fresh job of the bucket waits (it starts
    at scale 0)."""
    jobs = bucket_jobs(make_job, 3)
    published = hand_back_at_step(monkeypatch, 4)
    assert runner.run_job(jobs[0], NODE, grouped) == "handed_back"
    assert [(load_job(j).status, load_job(j).resume_scale) for j in jobs] == [("queued", 1)] * 3
    assert published == [jobs[0]]  # a new message for the delivered job; the others wait for it
    assert [load_job(j).published_at is None for j in jobs] == [False, True, True]
    fresh = bucket_jobs(make_job, 1)[0]
    groups = resumes(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    assert groups == [[4, 4, 4]]
    for job_id in jobs:
        job = load_job(job_id)
        assert job.status == "succeeded" and job.execution is not None and job.execution["group_size"] == 3
        assert job.progress["step"] == job.progress["total_steps"] == 6
    assert load_job(fresh).status == "queued"


@pytest.mark.parametrize(
    ("device", "batch_max", "expected"), [("cpu", None, 1), ("cuda:0", None, 16), ("cpu", 4, 4)]
)
def test_the_batch_limit(
    settings_factory: Callable[..., Settings], device: str, batch_max: int | None, expected: int
) -> None:
    assert batch.batch_limit(settings_factory(device=device, batch_max=batch_max)) == expected


def test_a_time_limit_ends_every_member(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import StyleTransfer

    def too_long(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(StyleTransfer, "run_group", too_long)
    jobs = bucket_jobs(make_job, 3)
    assert runner.run_job(jobs[0], NODE, grouped) == "failed"
    assert {(load_job(j).status, load_job(j).error_code) for j in jobs} == {("failed", "time_limit")}


def _one_mate_then(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The group's first look at the table takes one mate; the next raises ``error``."""
    real = batch._take_waiting
    calls = {"n": 0}

    def flaky(settings: Settings, among: Among, count: int) -> tuple[list[str], Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            return real(settings, among, 1)
        raise error

    monkeypatch.setattr(batch, "_take_waiting", flaky)


def test_a_database_outage_while_filling_the_group_gives_every_job_back(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, mate, third = bucket_jobs(make_job, 3)
    _one_mate_then(monkeypatch, OperationalError("SELECT", {}, Exception("server closed the connection")))
    with pytest.raises(OperationalError):  # its Celery task retries it
        runner.run_job(first, NODE, grouped.model_copy(update={"batch_wait_ms": 60_000}))
    delivered, taken, untouched = load_job(first), load_job(mate), load_job(third)
    assert (delivered.status, delivered.max_attempts) == ("queued", 4)  # no attempt used up
    assert delivered.published_at is not None  # its retry message is due
    assert (taken.status, taken.published_at, taken.max_attempts) == ("queued", None, 4)  # waiting again
    assert (untouched.status, untouched.attempt) == ("queued", 0)


def test_a_crash_while_filling_the_group_fails_the_delivered_job_and_gives_the_rest_back(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a transient error (a bug in the dispatcher's picks, say): the delivered job fails with a
    code as a run alone would, the mate already claimed waits again; none is left held."""
    first, mate, third = bucket_jobs(make_job, 3)
    _one_mate_then(monkeypatch, RuntimeError("a bug in the picks"))
    assert runner.run_job(first, NODE, grouped.model_copy(update={"batch_wait_ms": 60_000})) == "failed"
    delivered, taken, untouched = load_job(first), load_job(mate), load_job(third)
    assert (delivered.status, delivered.error_code) == ("failed", "internal_error")
    assert (taken.status, taken.worker, taken.published_at) == ("queued", None, None)
    assert (untouched.status, untouched.attempt) == ("queued", 0)


def test_a_claim_that_fails_leaves_the_jobs_taken_after_it_waiting(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher's take marks the picks published; a claim that raises part-way gives those
    not claimed back to waiting (published_at cleared), not to the reconciler's lost-message grace."""
    first, *rest = bucket_jobs(make_job, 3)
    claim = jobstore.claim

    def failing(url: str, job_id: str, *args: Any) -> Any:
        if job_id == rest[0]:
            raise OperationalError("UPDATE", {}, Exception("server closed the connection"))
        return claim(url, job_id, *args)

    monkeypatch.setattr(jobstore, "claim", failing)
    with pytest.raises(OperationalError):
        runner.run_job(first, NODE, grouped)
    assert load_job(first).status == "queued"
    for job_id in rest:
        job = load_job(job_id)
        assert (job.status, job.attempt, job.published_at) == ("queued", 0, None), job_id


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
