"""The runner with a fake engine on SQLite + folder storage: outcomes, checkpoints, cancel, retries."""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from shared.storage import StorageUnavailable, open_storage
from tests.support.jobs import CONTENT, NODE, LoadJob, MakeJob
from tests.support.waiting import wait_for
from tests.worker.fakes import FakeEngine
from worker import checkpoints, jobstore, runner, settle, watcher
from worker.engine import ImageError, Progress


def test_success_stores_result_and_every_checkpoint(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    synchronous_checkpoints: None,
) -> None:
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings) == "succeeded"
    job: Job = load_job(job_id)
    assert (job.status, job.attempt, job.result_key) == ("succeeded", 1, f"jobs/{job_id}/result.a1.png")
    assert job.progress["fraction"] == 1.0 and job.finished_at is not None
    storage = open_storage(settings)
    assert Image.open(io.BytesIO(storage.get_bytes(job.result_key or ""))).size == (32, 32)
    assert [(c["step"], c["seq"]) for c in job.checkpoints] == [(3, 0), (6, 1)]  # 2 <= keep (3)
    for ref in job.checkpoints:
        assert storage.exists(ref["key"]) and storage.exists(ref["preview_key"])
        assert storage.exists(ref["thumb_key"])  # and their thumbnails (tests/worker/test_thumbnails.py)
    assert job.execution is not None and storage.exists(job.execution["result_thumb_key"])
    # A second delivery of the finished job is dropped.
    assert runner.run_job(job_id, NODE, settings) == "dropped:terminal"


def test_output_format_jpeg(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    job_id = make_job(params={"size": 32, "min_size": 16, "output_format": "jpeg", "quality": 80})
    assert runner.run_job(job_id, NODE, settings) == "succeeded"
    key = load_job(job_id).result_key or ""
    assert key.endswith("result.a1.jpg")
    assert Image.open(io.BytesIO(open_storage(settings).get_bytes(key))).format == "JPEG"


def test_resumes_from_latest_checkpoint(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    job_id = make_job()
    engine.error = None
    calls = {"n": 0}
    real = checkpoints.CheckpointSaver.__call__

    def crash_after_first(self: Any, ckpt: Any) -> None:
        real(self, ckpt)  # handed over, not waited for: the failing run still records it (settled)
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("broker gone")  # transient: the job is given back

    checkpoints.CheckpointSaver.__call__ = crash_after_first  # type: ignore[method-assign]
    try:
        with pytest.raises(ConnectionError):
            runner.run_job(job_id, NODE, settings)
        job = load_job(job_id)
        assert (job.status, job.attempt) == ("queued", 1)
        assert runner.run_job(job_id, NODE, settings) == "succeeded"
    finally:
        checkpoints.CheckpointSaver.__call__ = real  # type: ignore[method-assign]
    assert engine.resumed_from == [None, 3]
    assert load_job(job_id).attempt == 2


def test_bad_image_fails_permanently(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    open_storage(settings).put_bytes(f"images/{CONTENT}", b"not an image")
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert job.status == "failed" and job.error_retryable is False
    assert job.error_code in {c for c in ("not_an_image", "unsupported_format", "truncated")}


def test_engine_error_code_is_kept(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    engine.error = ImageError("too_small", "style too small")
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.error_code, job.error_message, job.error_retryable) == ("too_small", "style too small", False)


def test_invalid_params_fail(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    job_id = make_job(params={"size": 32, "bogus": 1})
    assert runner.run_job(job_id, NODE, settings) == "failed"
    assert load_job(job_id).error_code == "invalid_params"


def test_transient_storage_error_gives_job_back(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.error = StorageUnavailable("S3 down")
    job_id = make_job()
    with pytest.raises(StorageUnavailable):
        runner.run_job(job_id, NODE, settings)
    job = load_job(job_id)
    assert (job.status, job.attempt, job.worker) == ("queued", 1, None)


def test_cancel_of_running_job_stops_within_a_second(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    engine.iterations, engine.delay_s = 200, 0.02  # 8 s if not canceled
    job_id = make_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, NODE, settings)))
    thread.start()
    wait_for(lambda: load_job(job_id).status == "running", 10, "the job to run", interval=0.02)
    # well under way (an event, not a fixed sleep): a few iterations reported
    wait_for(lambda: int((load_job(job_id).progress or {}).get("step", 0)) >= 5, 10, "5 steps", interval=0.02)
    with get_sessionmaker(settings.database_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.cancel_requested = True
        s.commit()
    asked = time.monotonic()
    thread.join(timeout=10)
    assert outcome == ["canceled"] and time.monotonic() - asked < 2.0
    job = load_job(job_id)
    assert job.status == "canceled" and job.finished_at is not None
    assert 0 < job.progress["step"] < 400


def test_newer_attempt_fences_the_old_one(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    engine.iterations, engine.delay_s = 200, 0.02
    job_id = make_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, NODE, settings)))
    thread.start()
    wait_for(lambda: load_job(job_id).status == "running", 10, "the job to run", interval=0.02)
    with get_sessionmaker(settings.database_url)() as s:  # as if the lease expired and another took it
        s.query(Job).filter(Job.id == job_id).update({"attempt": 2, "worker": "other@h#1"})
        s.commit()
    thread.join(timeout=10)
    assert outcome == ["fenced"]
    job = load_job(job_id)
    assert (job.status, job.attempt, job.worker, job.result_key) == ("running", 2, "other@h#1", None)


def test_shutdown_hands_job_back_and_republishes(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[str] = []
    monkeypatch.setattr(settle, "publish_job", lambda _app, job_id: published.append(job_id))
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    monkeypatch.setattr(runner, "get_celery", lambda: None)
    engine.iterations, engine.delay_s = 200, 0.02
    job_id = make_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, NODE, settings)))
    thread.start()
    wait_for(lambda: load_job(job_id).status == "running", 10, "the job to run", interval=0.02)
    watcher.SHUTDOWN.set()
    try:
        thread.join(timeout=10)
    finally:
        watcher.SHUTDOWN.clear()
    assert outcome == ["handed_back"] and published == [job_id]
    job = load_job(job_id)
    assert (job.status, job.attempt, job.max_attempts) == ("queued", 1, 4)


def test_shutdown_checkpoints_the_current_iteration_before_handing_back(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watcher's ``on_progress`` answers a shutdown with ``CHECKPOINT_NOW``; the engine (the fake
    keeps the real one's contract) checkpoints that iteration, mid-scale, before the job goes back."""
    monkeypatch.setattr(settle, "publish_job", lambda _app, _job_id: None)
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    monkeypatch.setattr(runner, "get_celery", lambda: None)
    engine.iterations, engine.delay_s = 200, 0.02
    job_id = make_job()
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, NODE, settings)))
    thread.start()
    wait_for(lambda: bool(load_job(job_id).progress), 10, "progress", interval=0.02)
    watcher.SHUTDOWN.set()
    try:
        thread.join(timeout=10)
    finally:
        watcher.SHUTDOWN.clear()
    assert outcome == ["handed_back"]
    last = load_job(job_id).checkpoints[-1]
    assert last["end_of_scale"] is False and 0 < last["step"] < 200


def test_progress_is_written_while_running(
    settings: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    engine.iterations, engine.delay_s = 40, 0.02
    job_id = make_job()
    thread = threading.Thread(target=runner.run_job, args=(job_id, NODE, settings))
    thread.start()
    wait_for(lambda: bool(load_job(job_id).progress), 10, "progress", interval=0.02)
    snap = load_job(job_id).progress
    thread.join(timeout=10)
    assert set(snap) == {
        "scale",
        "scales",
        "iteration",
        "iterations",
        "step",
        "total_steps",
        "fraction",
        "loss",
        "eta_seconds",
        "history",
    }
    assert snap["total_steps"] == 80 and 0 < snap["fraction"] < 1
    history = snap["history"]  # the loss curve so far: [scale, iteration, loss], bounded
    assert history and all(len(p) == 3 for p in history) and len(history) <= 64 * snap["scales"]


def test_progress_dict_eta() -> None:
    started = time.monotonic() - 10  # 5 steps in 10 s -> 15 steps left = 30 s
    d = watcher.progress_dict(_progress(), started, 0)
    assert d["fraction"] == 0.25 and 29 <= d["eta_seconds"] <= 31


def _progress() -> Progress:
    """Iteration 5 of 10 of the first of two scales (step 5 of 20)."""
    return Progress(
        scale=0,
        scales=2,
        size=(16, 16),
        iteration=5,
        iterations=10,
        step=5,
        total_steps=20,
        loss=2.0,
        content_loss=0,
        style_loss=0,
        tv_loss=0,
        elapsed=0,
        lr=1,
        recoveries=0,
    )


def test_a_group_member_waiting_for_the_others_is_stopped_and_adds_nothing(settings: Settings) -> None:
    """A waiting progress (engine.group: the member ended its scale first) repeats the last one:
    no new point, no checkpoint asked for; a stop (here a cancel) ends the member at once."""
    w = watcher.Watcher(settings, "j1", 1, 0, [16, 32])  # not started: no thread reads the job
    w.on_progress(_progress())
    waiting = dataclasses.replace(_progress(), waiting=True)
    assert w.on_progress(waiting) is None and len(w.history.points()) == 1
    w.stop = watcher.StopReason.CANCELED  # what its thread sets on seeing the request
    with pytest.raises(watcher.JobStopped):
        w.on_progress(waiting)


def test_worker_identity_names_node_and_pid() -> None:
    assert jobstore.worker_identity("gpu0@h").startswith("gpu0@h#")


def test_progress_eta_weights_later_scales_by_pixels() -> None:
    now = time.monotonic()
    # 5 iterations of a 64 px scale in 5 s: 5 more there (5 s), then 10 at 128 px (4x: 40 s).
    d = watcher.progress_dict(_progress(), now - 5, 0, pace=(now - 5, 0), edges=[64, 128])
    assert 44 <= d["eta_seconds"] <= 46
