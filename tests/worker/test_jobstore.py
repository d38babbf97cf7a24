"""Claiming and fencing on a real (SQLite) database."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from shared.models import Job, utcnow
from shared.settings import Settings
from tests.worker.conftest import LoadJob, MakeJob
from worker import jobstore
from worker.jobstore import Claim, Drop

ME = jobstore.worker_identity(f"cpu@{socket.gethostname()}")
OTHER = "gpu1@elsewhere#4242"


def test_claim_queued_job_starts_attempt_one(
    settings: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    job_id = make_job()
    got = jobstore.claim(settings.database_url, job_id, ME, 60)
    assert isinstance(got, Claim) and got.attempt == 1
    job = load_job(job_id)
    assert (job.status, job.attempt, job.worker) == ("running", 1, ME)
    assert job.started_at is not None and job.heartbeat_at is not None


def test_duplicate_delivery_of_live_job_is_dropped(settings: Settings, make_job: MakeJob) -> None:
    job_id = make_job(status="running", attempt=1, worker=OTHER, heartbeat_at=utcnow())
    assert jobstore.claim(settings.database_url, job_id, ME, 60) is Drop.LIVE_ELSEWHERE


def test_expired_lease_is_taken_over_and_old_attempt_fenced(
    settings: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    url = settings.database_url
    job_id = make_job(status="running", attempt=1, worker=OTHER, heartbeat_at=utcnow() - timedelta(minutes=5))
    got = jobstore.claim(url, job_id, ME, 60)
    assert isinstance(got, Claim) and got.attempt == 2
    # The old attempt's writes now change nothing.
    assert not jobstore.heartbeat(url, job_id, 1, {"step": 3})
    assert not jobstore.append_checkpoint(url, job_id, 1, {"key": "k"})
    assert not jobstore.succeed(url, job_id, 1, "jobs/x/result.png", {})
    assert jobstore.heartbeat(url, job_id, 2, {"step": 4})
    assert load_job(job_id).progress == {"step": 4}


def test_dead_holder_on_this_host_is_taken_over_at_once(settings: Settings, make_job: MakeJob) -> None:
    proc = __import__("subprocess").Popen(["true"])
    proc.wait()  # a pid that no longer exists
    dead = f"cpu@{socket.gethostname()}#{proc.pid}"
    job_id = make_job(status="running", attempt=1, worker=dead, heartbeat_at=utcnow())
    got = jobstore.claim(settings.database_url, job_id, ME, 60)
    assert isinstance(got, Claim) and got.attempt == 2
    live = f"cpu@{socket.gethostname()}#{os.getppid()}"
    other = make_job(status="running", attempt=1, worker=live, heartbeat_at=utcnow())
    assert jobstore.claim(settings.database_url, other, ME, 60) is Drop.LIVE_ELSEWHERE


def test_terminal_and_canceled_and_missing(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    url = settings.database_url
    for status in ("succeeded", "failed", "canceled"):
        assert jobstore.claim(url, make_job(status=status), ME, 60) is Drop.TERMINAL
    job_id = make_job(cancel_requested=True)
    assert jobstore.claim(url, job_id, ME, 60) is Drop.CANCELED
    assert load_job(job_id).status == "canceled"
    assert jobstore.claim(url, "no-such-job", ME, 60) is Drop.MISSING


def test_attempt_cap_fails_with_worker_lost(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    job_id = make_job(
        status="running",
        attempt=3,
        max_attempts=3,
        worker=OTHER,
        heartbeat_at=utcnow() - timedelta(minutes=5),
    )
    assert jobstore.claim(settings.database_url, job_id, ME, 60) is Drop.EXHAUSTED
    job: Job = load_job(job_id)
    assert (job.status, job.error_code, job.attempt) == ("failed", "worker_lost", 3)
    assert job.finished_at is not None


def test_concurrent_claims_have_one_winner(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    job_id = make_job()
    results: list[object] = []
    barrier = threading.Barrier(4)

    def claim(n: int) -> None:
        barrier.wait()
        results.append(jobstore.claim(settings.database_url, job_id, f"n{n}@h#1", 60))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, Claim) for r in results) == 1
    assert load_job(job_id).attempt == 1


def test_release_and_graceful_release(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    url = settings.database_url
    job_id = make_job()
    got = jobstore.claim(url, job_id, ME, 60)
    assert isinstance(got, Claim)
    assert jobstore.release(url, job_id, got.attempt, graceful=True)
    job = load_job(job_id)
    assert (job.status, job.attempt, job.max_attempts, job.worker) == ("queued", 1, 4, None)
    again = jobstore.claim(url, job_id, ME, 60)
    assert isinstance(again, Claim) and again.attempt == 2
    assert jobstore.release(url, job_id, 2, graceful=False)
    assert jobstore.fail_released(url, job_id, "unavailable", "gave up")
    job = load_job(job_id)
    assert (job.status, job.error_code, job.error_retryable) == ("failed", "unavailable", True)


def test_checkpoint_refs_append_in_order(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    url = settings.database_url
    job_id = make_job()
    got = jobstore.claim(url, job_id, ME, 60)
    assert isinstance(got, Claim)
    for step in (2, 4, 4):
        assert jobstore.append_checkpoint(url, job_id, 1, {"key": f"k{step}", "step": step})
    assert [c["step"] for c in load_job(job_id).checkpoints] == [2, 4]
