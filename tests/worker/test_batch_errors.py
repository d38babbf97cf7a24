"""A GPU group's error paths (worker.batch): whatever raises, and wherever, no job of the group is
left held without a watcher, none is settled or counted twice, a transient error uses no attempt, and
each member ends as it would alone (a cancel as canceled, a time limit as time_limit)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from shared.settings import Settings
from shared.storage import StorageUnavailable
from tests.support.jobs import NODE, LoadJob, MakeJob
from worker import batch, batch_members, checkpoints, config, jobstore, metrics, runner, runtime, settle
from worker.watcher import StopReason, Watcher

from .batchkit import bucket_jobs, grouped, republished

__all__ = ["grouped"]  # the fixture


def _ended(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Each attempt's end as counted (worker.metrics): (job id, outcome)."""
    seen: list[tuple[str, str]] = []
    count = metrics.attempt_ended

    def spy(job_id: str, outcome: str, code: str | None = None) -> None:
        seen.append((job_id, outcome))
        count(job_id, outcome, code)

    monkeypatch.setattr(metrics, "attempt_ended", spy)
    return seen


def _oom_after_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group runs, then fails as a whole."""
    from worker.engine import StyleTransfer

    run_group = StyleTransfer.run_group

    def fail_late(self: StyleTransfer, group: Any, config: Any, **kw: Any) -> Any:
        run_group(self, group, config, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StyleTransfer, "run_group", fail_late)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(StorageUnavailable("storage down"), "transient"), (RuntimeError("a bug"), "failed")],
    ids=["transient", "crash"],
)
def test_an_error_outside_every_members_guard_settles_the_delivered_job(
    grouped: Settings,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    outcome: str,
) -> None:
    """Storage cannot be opened for the group: the delivered job gets a run alone's outcome (given
    back for its task's retry, or failed with a code), never left held until its lease runs out; the
    others wait again."""

    def unopenable(_settings: Settings) -> Any:
        raise error

    monkeypatch.setattr(batch, "open_storage", unopenable)
    republished(monkeypatch)
    jobs = bucket_jobs(make_job, 3)
    if outcome == "transient":
        with pytest.raises(StorageUnavailable):  # raised on: the task retries it
            runner.run_job(jobs[0], NODE, grouped)
        assert load_job(jobs[0]).status == "queued"
    else:
        assert runner.run_job(jobs[0], NODE, grouped) == "failed"
        first = load_job(jobs[0])
        assert (first.status, first.error_code) == ("failed", "internal_error")
    for job_id in jobs[1:]:
        mate = load_job(job_id)
        assert (mate.status, mate.worker, mate.attempt) == ("queued", None, 1)


def test_a_saver_that_fails_to_close_leaves_no_job_held(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's checkpoint savers are closed outside every member's guard: a failure there (the
    database went away as the last upload was recorded) gives every job back, none left held."""
    close = checkpoints.CheckpointSaver.close

    def failing(self: checkpoints.CheckpointSaver, **kw: Any) -> None:
        close(self, **kw)
        raise OperationalError("UPDATE jobs", {}, Exception("database went away"))

    monkeypatch.setattr(checkpoints.CheckpointSaver, "close", failing)
    republished(monkeypatch)
    jobs = bucket_jobs(make_job, 3)
    with pytest.raises(OperationalError):  # the delivered job's: its task retries it
        runner.run_job(jobs[0], NODE, grouped)
    for job_id in jobs:
        job = load_job(job_id)
        assert (job.status, job.worker) == ("queued", None), job_id


def test_an_engine_the_group_cannot_build_leaves_the_job_to_its_run_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the engine is the run alone's to fail (guarded, with the job's code): the group path
    steps aside rather than let the error escape with the job held."""

    def unbuildable(_settings: Settings) -> Any:
        raise RuntimeError("no device")

    monkeypatch.setattr(batch, "get_engine", unbuildable)
    jobs = bucket_jobs(make_job, 2)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"  # alone: the runner's engine builds
    assert (load_job(jobs[0]).execution or {}).get("group_size") == 1
    assert load_job(jobs[1]).status == "queued"


def _transient_then_failed_release(monkeypatch: pytest.MonkeyPatch, job_id: str) -> list[str]:
    """The job's inputs hit a storage blip, and the write giving it back a database blip (once)."""
    load, release, failed = config.load_inputs, jobstore.release, list[str]()

    def load_inputs(storage: Any, claim: Any, settings: Any) -> Any:
        if claim.job_id == job_id:
            raise StorageUnavailable("storage blip")
        return load(storage, claim, settings)

    def flaky(url: str, this: str, attempt: int, **kw: Any) -> bool:
        if this == job_id and not failed:
            failed.append(this)
            raise OperationalError("UPDATE jobs", {}, Exception("database blip"))
        return release(url, this, attempt, **kw)

    monkeypatch.setattr(batch_members, "load_inputs", load_inputs)
    monkeypatch.setattr(jobstore, "release", flaky)
    return failed


def _canceled_at(monkeypatch: pytest.MonkeyPatch, job_id: str, step: int) -> None:
    """The job's watcher sees it canceled at ``step``."""
    seen = Watcher.on_progress

    def on_progress(self: Watcher, p: Any) -> str | None:
        if self.job_id == job_id and p.step >= step:
            self.stop = StopReason.CANCELED
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)


def test_a_broker_blip_handing_the_delivered_job_back_still_sends_the_others_back_alone(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group failed as a whole; the delivered job's new message cannot be published: the others
    were handed back alone first (bucket cleared, each attempt's end counted once), then its error is
    raised on for its task's retry."""
    _oom_after_running(monkeypatch)
    monkeypatch.setattr(settle, "get_celery", lambda: None)

    def publish(_app: Any, job_id: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(settle, "publish_job", publish)
    ended = _ended(monkeypatch)
    jobs = bucket_jobs(make_job, 3)
    with pytest.raises(ConnectionError):
        runner.run_job(jobs[0], NODE, grouped)
    assert [(load_job(j).status, load_job(j).bucket, load_job(j).worker) for j in jobs[1:]] == [
        ("queued", None, None)
    ] * 2
    assert sorted(ended) == sorted(
        [(jobs[0], "transient"), (jobs[1], "handed_back"), (jobs[2], "handed_back")]
    )


def test_a_transient_error_whose_release_failed_is_released_again_and_counted_once(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = bucket_jobs(make_job, 2)
    failed = _transient_then_failed_release(monkeypatch, jobs[0])
    ended = _ended(monkeypatch)
    with pytest.raises(StorageUnavailable):
        runner.run_job(jobs[0], NODE, grouped)
    assert failed and [o for j, o in ended if j == jobs[0]] == ["transient"]
    assert (load_job(jobs[0]).status, load_job(jobs[0]).worker) == ("queued", None)


def test_a_member_canceled_before_the_group_failed_ends_canceled(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a run alone: the delivery's outcome is canceled (its slot is free), not handed back."""
    jobs = bucket_jobs(make_job, 2)
    _canceled_at(monkeypatch, jobs[0], 2)
    _oom_after_running(monkeypatch)
    republished(monkeypatch)
    ended = _ended(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "canceled"
    assert load_job(jobs[0]).status == "canceled"
    assert [o for j, o in ended if j == jobs[0]] == ["canceled"]
    assert (load_job(jobs[1]).status, load_job(jobs[1]).bucket) == ("queued", None)  # back alone


def test_a_time_limit_landing_in_a_members_callback_ends_every_member(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    """Celery raises the soft limit wherever the main thread is: inside one member's progress
    callback it is the group's, not that member's alone (the group would run on to the hard kill)."""
    jobs = bucket_jobs(make_job, 3)
    seen, fired = Watcher.on_progress, list[int]()

    def on_progress(self: Watcher, p: Any) -> str | None:
        if self.job_id == jobs[1] and p.step >= 2 and not fired:
            fired.append(p.step)
            raise SoftTimeLimitExceeded()
        return seen(self, p)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Watcher, "on_progress", on_progress)
        assert runner.run_job(jobs[0], NODE, grouped) == "failed"
    assert fired
    assert [(load_job(j).status, load_job(j).error_code) for j in jobs] == [("failed", "time_limit")] * 3


def test_a_time_limit_while_a_member_is_prepared_is_the_groups(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Landing while a mate's inputs load: the delivered job fails time_limit, the group does not
    run, and the others wait again (they never ran)."""
    jobs = bucket_jobs(make_job, 3)
    load = config.load_inputs

    def load_inputs(storage: Any, claim: Any, settings: Any) -> Any:
        if claim.job_id == jobs[1]:
            raise SoftTimeLimitExceeded()
        return load(storage, claim, settings)

    monkeypatch.setattr(batch_members, "load_inputs", load_inputs)
    assert runner.run_job(jobs[0], NODE, grouped) == "failed"
    assert (load_job(jobs[0]).status, load_job(jobs[0]).error_code) == ("failed", "time_limit")
    assert [(load_job(j).status, load_job(j).worker) for j in jobs[1:]] == [("queued", None)] * 2


def _limit_once(when: Any) -> tuple[Any, list[Any]]:
    """A wrapper of ``when`` (a function) that raises the soft time limit at its first call, as if
    the signal landed there; the calls it fired at."""
    fired: list[Any] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(args[:1])
            raise SoftTimeLimitExceeded()
        return when(*args, **kwargs)

    return wrapper, fired


@pytest.mark.parametrize("where", ["item_checkpoint", "cancel_write", "get_engine"])
def test_a_time_limit_landing_in_the_engine_or_a_cleanup_is_never_swallowed(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The engine's own work inside a member's read (a checkpoint's copies), a best-effort write
    (a member's cancel) and the wait for the engine: each ends the delivery with time_limit."""
    from worker.engine import group_resume

    jobs = bucket_jobs(make_job, 3)
    if where == "item_checkpoint":
        wrapper, fired = _limit_once(group_resume.item_checkpoint)
        monkeypatch.setattr(group_resume, "item_checkpoint", wrapper)
    elif where == "cancel_write":
        _canceled_at(monkeypatch, jobs[1], 2)
        wrapper, fired = _limit_once(jobstore.cancel)
        monkeypatch.setattr(jobstore, "cancel", wrapper)
    else:
        wrapper, fired = _limit_once(runtime.get_engine)
        monkeypatch.setattr(batch, "get_engine", wrapper)
    assert runner.run_job(jobs[0], NODE, grouped) == "failed"
    assert fired
    assert (load_job(jobs[0]).status, load_job(jobs[0]).error_code) == ("failed", "time_limit")
    for job_id in jobs[1:]:  # none left held: ended by the limit, canceled, or never taken
        assert load_job(job_id).status in {"failed", "canceled", "queued"}


def test_a_mate_whose_transient_release_failed_is_given_back_once_the_group_ran(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its end counted once (transient), and back to waiting rather than held with no watcher until
    its lease runs out (which would cost it an attempt)."""
    jobs = bucket_jobs(make_job, 2)
    failed = _transient_then_failed_release(monkeypatch, jobs[1])
    ended = _ended(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "succeeded"
    mate = load_job(jobs[1])
    assert failed and (mate.status, mate.worker, mate.max_attempts) == ("queued", None, 4)
    assert [o for j, o in ended if j == jobs[1]] == ["transient"]


def test_a_member_canceled_before_a_time_limit_ends_canceled(
    grouped: Settings, make_job: MakeJob, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = bucket_jobs(make_job, 3)
    seen, fired = Watcher.on_progress, list[int]()

    def on_progress(self: Watcher, p: Any) -> str | None:
        if self.job_id == jobs[0] and p.step >= 1:
            self.stop = StopReason.CANCELED
        if self.job_id == jobs[2] and p.step >= 3 and not fired:
            fired.append(p.step)
            raise SoftTimeLimitExceeded()
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)
    ended = _ended(monkeypatch)
    assert runner.run_job(jobs[0], NODE, grouped) == "canceled"
    assert fired and [o for j, o in ended if j == jobs[0]] == ["canceled"]
    assert [(load_job(j).status, load_job(j).error_code) for j in jobs[1:]] == [("failed", "time_limit")] * 2
