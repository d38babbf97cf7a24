"""Checkpoints uploaded in the background, the latest only, on a time cadence (worker.checkpoints).

A gated storage stands for a slow S3: its checkpoint PUTs wait until the test opens the gate, so the
tests wait for events (a PUT begun, a flush begun), never for fixed times.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shared.settings import Settings
from shared.storage import Storage, StorageUnavailable, open_storage
from tests.support.jobs import NODE, LoadJob, MakeJob
from tests.support.waiting import wait_for
from tests.worker.fakes import FakeEngine, checkpoint
from worker import checkpoints, jobstore, runner, settle, watcher
from worker.engine import CHECKPOINT_NOW, Progress
from worker.watcher import JobStopped, StopReason, Watcher

WAIT_S = 30  # an upper bound for events that happen at once; never waited out when all is well


class GatedStorage:
    """Real folder storage whose checkpoint PUTs wait while ``gate`` is closed (a slow or hung S3)
    and can be told to fail (``failures``: how many of the next checkpoint PUTs raise)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.failures = 0
        self.puts: list[str] = []  # checkpoint keys, in the order their PUTs began
        self._cond = threading.Condition()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        if "/checkpoints/" in key:
            with self._cond:
                self.puts.append(key)
                self._cond.notify_all()
                fail, self.failures = self.failures > 0, max(self.failures - 1, 0)
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
            if fail:
                raise StorageUnavailable("S3 timed out")
        self.inner.put_bytes(key, data, content_type)

    def wait_puts(self, n: int) -> list[str]:
        """Once ``n`` checkpoint PUTs began: their keys."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.puts) >= n, WAIT_S), self.puts
            return list(self.puts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(settings: Settings) -> GatedStorage:
    return GatedStorage(open_storage(settings))


@pytest.fixture
def claim(settings: Settings, make_job: MakeJob) -> jobstore.Claim:
    got = jobstore.claim(settings.database_url, make_job(), "cpu@h#1", 60)
    assert isinstance(got, jobstore.Claim)
    return got


@pytest.fixture
def saver(
    settings: Settings, storage: GatedStorage, claim: jobstore.Claim
) -> Iterator[checkpoints.CheckpointSaver]:
    watch = Watcher(settings, claim.job_id, claim.attempt)  # its thread is not needed here
    with checkpoints.CheckpointSaver(storage, settings.database_url, claim, watch, 3) as s:
        yield s
        storage.gate.set()  # a failed test must not leave the uploader waiting
    assert not s._thread.is_alive()  # the thread never outlives the attempt


def recorded_steps(load_job: LoadJob, job_id: str) -> list[int]:
    return [int(c["step"]) for c in load_job(job_id).checkpoints]


def test_on_checkpoint_returns_while_the_upload_is_blocked(
    saver: checkpoints.CheckpointSaver, storage: GatedStorage, load_job: LoadJob
) -> None:
    storage.gate.clear()
    saver(checkpoint(2))  # returns at once: the loop goes on while S3 is slow
    assert storage.wait_puts(1) == [f"jobs/{saver.claim.job_id}/checkpoints/2.pt"]
    assert saver.last_step is None and recorded_steps(load_job, saver.claim.job_id) == []
    storage.gate.set()
    assert saver.flush(WAIT_S)
    assert saver.last_step == 2 and recorded_steps(load_job, saver.claim.job_id) == [2]


def test_a_waiting_checkpoint_is_replaced_by_a_newer_one(
    saver: checkpoints.CheckpointSaver, storage: GatedStorage, load_job: LoadJob
) -> None:
    storage.gate.clear()
    saver(checkpoint(2))
    storage.wait_puts(1)  # step 2 is being uploaded
    saver(checkpoint(4))  # waits behind it...
    saver(checkpoint(6))  # ...and is replaced: step 6 holds all of its work
    storage.gate.set()
    assert saver.flush(WAIT_S)
    job_id = saver.claim.job_id
    assert recorded_steps(load_job, job_id) == [2, 6] and saver.last_step == 6
    assert not [k for k in storage.puts if "/checkpoints/4." in k]  # never uploaded


def test_flush_waits_for_the_upload_in_progress_and_the_waiting_one(
    saver: checkpoints.CheckpointSaver, storage: GatedStorage, load_job: LoadJob
) -> None:
    storage.gate.clear()
    saver(checkpoint(2))
    storage.wait_puts(1)
    saver(checkpoint(4))
    assert saver.flush(0.05) is False  # step 2 is still in its PUT, step 4 waits behind it
    storage.gate.set()
    assert saver.flush(WAIT_S) is True
    assert recorded_steps(load_job, saver.claim.job_id) == [2, 4] and saver.last_step == 4


def test_an_upload_error_is_logged_and_the_next_checkpoint_is_recorded(
    saver: checkpoints.CheckpointSaver,
    storage: GatedStorage,
    load_job: LoadJob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage.failures = 1
    with caplog.at_level(logging.WARNING, logger=checkpoints.logger.name):
        saver(checkpoint(2))  # nothing is raised into the engine
        assert saver.flush(WAIT_S)
        saver(checkpoint(4))
        assert saver.flush(WAIT_S)
    job_id = saver.claim.job_id
    failed = [r.getMessage() for r in caplog.records if "event=checkpoint_failed" in r.getMessage()]
    assert failed == [
        f"job_event job_id={job_id} attempt=1 event=checkpoint_failed step=2 "
        "error=StorageUnavailable detail='S3 timed out'"
    ]
    assert recorded_steps(load_job, job_id) == [4] and saver.last_step == 4
    assert saver.watcher.stop is None  # the job goes on


def test_a_fenced_record_stops_the_run_at_its_next_progress(
    saver: checkpoints.CheckpointSaver, settings: Settings, load_job: LoadJob
) -> None:
    jobstore.release(settings.database_url, saver.claim.job_id, saver.claim.attempt, graceful=True)
    saver(checkpoint(2))  # the job is no longer this attempt's: its record is fenced out
    assert saver.flush(WAIT_S)
    assert saver.last_step is None and recorded_steps(load_job, saver.claim.job_id) == []
    with pytest.raises(JobStopped) as stopped:
        saver.watcher.on_progress(progress(3))
    assert stopped.value.reason is StopReason.FENCED


def test_a_cancel_drops_the_waiting_checkpoint(
    saver: checkpoints.CheckpointSaver,
    storage: GatedStorage,
    load_job: LoadJob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage.gate.clear()
    saver(checkpoint(2))
    storage.wait_puts(1)
    saver(checkpoint(4))
    saver.watcher.stop = StopReason.CANCELED
    with caplog.at_level(logging.INFO, logger=checkpoints.logger.name):
        closing = threading.Thread(target=saver.__exit__, args=(None, None, None))
        closing.start()
        wait_for(lambda: "event=checkpoint_dropped step=4" in caplog.text, WAIT_S, "the drop")
        storage.gate.set()  # the upload in progress finishes; the dropped one never starts
        closing.join(WAIT_S)
    assert not closing.is_alive()
    assert recorded_steps(load_job, saver.claim.job_id) == [2]
    assert not [k for k in storage.puts if "/checkpoints/4." in k]


def test_the_time_cadence_asks_for_a_checkpoint_once_the_interval_passed(settings: Settings) -> None:
    clock = FakeClock()
    watch = Watcher(settings.model_copy(update={"checkpoint_interval_s": 30.0}), "j", 1, clock=clock)
    assert watch.on_progress(progress(1)) is None
    clock.now += 29.9
    assert watch.on_progress(progress(2)) is None
    clock.now += 0.1
    assert watch.on_progress(progress(3)) == CHECKPOINT_NOW
    clock.now += 1  # the engine did not checkpoint (it always does): it is still due
    assert watch.on_progress(progress(4)) == CHECKPOINT_NOW
    watch.cadence.taken()  # a checkpoint (any: asked for, a scale's end, every N iterations)
    clock.now += 29.9
    assert watch.on_progress(progress(5)) is None
    clock.now += 0.1
    assert watch.on_progress(progress(6)) == CHECKPOINT_NOW


def test_an_interval_of_zero_never_asks(settings: Settings) -> None:
    clock = FakeClock()
    watch = Watcher(settings.model_copy(update={"checkpoint_interval_s": 0.0}), "j", 1, clock=clock)
    clock.now += 1e6
    assert watch.on_progress(progress(1)) is None


def test_a_checkpoint_handed_to_the_saver_restarts_the_cadence(
    settings: Settings, storage: GatedStorage, claim: jobstore.Claim
) -> None:
    clock = FakeClock()
    every_30s = settings.model_copy(update={"checkpoint_interval_s": 30.0})
    watch = Watcher(every_30s, claim.job_id, claim.attempt, clock=clock)
    with checkpoints.CheckpointSaver(storage, settings.database_url, claim, watch, 3) as saver:
        clock.now += 20
        saver(checkpoint(2, end_of_scale=True))  # a scale's end, 20 s in
        clock.now += 20  # 40 s since the start, 20 s since that checkpoint
        assert watch.on_progress(progress(3)) is None
        clock.now += 10
        assert watch.on_progress(progress(4)) == CHECKPOINT_NOW


def test_a_run_checkpoints_mid_scale_on_the_time_cadence(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    synchronous_checkpoints: None,
) -> None:
    engine.iterations, engine.delay_s = 30, 0.02  # 0.6 s a scale: several 0.1 s intervals
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings.model_copy(update={"checkpoint_interval_s": 0.1})) == (
        "succeeded"
    )
    refs = load_job(job_id).checkpoints
    assert refs[-1]["step"] == 60 and refs[-1]["end_of_scale"] is True
    assert any(ref["end_of_scale"] is False for ref in refs), refs


def test_a_shutdown_records_its_checkpoint_before_the_job_is_released(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    storage: GatedStorage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shutdown's checkpoint is uploaded in the background like any other; the runner waits for
    it (flush) before it hands the job back, so the next attempt resumes from that iteration."""
    monkeypatch.setattr(runner, "open_storage", lambda _s: storage)
    monkeypatch.setattr(settle, "publish_job", lambda _app, _job_id: None)
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    monkeypatch.setattr(runner, "get_celery", lambda: None)
    at_release, flushing = spy_release_and_flush(monkeypatch, load_job)
    engine.iterations, engine.delay_s = 200, 0.02  # no scale ends for 4 s
    job_id = make_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, NODE, settings)))
    storage.gate.clear()
    with caplog.at_level(logging.INFO, logger="worker"):
        thread.start()
        wait_for(lambda: bool(load_job(job_id).progress), 10, "progress", interval=0.02)
        watcher.SHUTDOWN.set()
        try:
            storage.wait_puts(1)  # the shutdown's checkpoint, blocked in its PUT
            assert flushing.wait(WAIT_S)  # the run stopped and waits for the upload...
            assert at_release == [] and load_job(job_id).status == "running"  # ...holding the job
            storage.gate.set()
            thread.join(WAIT_S)
        finally:
            watcher.SHUTDOWN.clear()
            storage.gate.set()
    assert outcome == ["handed_back"]
    (refs,) = at_release
    assert refs and refs[-1]["end_of_scale"] is False and 0 < refs[-1]["step"] < 200
    assert f"event=handed_back checkpoint_step={refs[-1]['step']}" in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-")]


def spy_release_and_flush(
    monkeypatch: pytest.MonkeyPatch, load_job: LoadJob
) -> tuple[list[list[dict[str, Any]]], threading.Event]:
    """The job's checkpoint refs at each release (what a next attempt resumes from), and an event
    set once a saver's flush began."""
    at_release: list[list[dict[str, Any]]] = []
    flushing = threading.Event()
    real_release, real_flush = jobstore.release, checkpoints.CheckpointSaver.flush

    def release(url: str, job_id: str, attempt: int, **kw: Any) -> bool:
        at_release.append(load_job(job_id).checkpoints)
        return real_release(url, job_id, attempt, **kw)

    def flush(self: checkpoints.CheckpointSaver, timeout: float | None = None) -> bool:
        flushing.set()
        return real_flush(self, timeout)

    monkeypatch.setattr(jobstore, "release", release)
    monkeypatch.setattr(checkpoints.CheckpointSaver, "flush", flush)
    return at_release, flushing


def progress(step: int) -> Progress:
    return Progress(
        scale=0,
        scales=1,
        size=(8, 8),
        iteration=step,
        iterations=100,
        step=step,
        total_steps=100,
        loss=1.0,
        content_loss=0,
        style_loss=0,
        tv_loss=0,
        elapsed=0,
        lr=1,
        recoveries=0,
    )
