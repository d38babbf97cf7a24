"""Claiming and fencing on a real (SQLite) database."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from shared.models import Job, utcnow
from shared.settings import Settings
from tests.support.jobs import LoadJob, MakeJob
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
    assert jobstore.append_checkpoint(url, job_id, 1, {"key": "k"}, 3) is None
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
        assert jobstore.append_checkpoint(url, job_id, 1, {"key": f"k{step}", "step": step}, 3)
    # The second k4 replaced the first (same object) under a new seq.
    assert [(c["step"], c["seq"]) for c in load_job(job_id).checkpoints] == [(2, 0), (4, 2)]


def test_recording_beyond_keep_drops_the_oldest(
    settings: Settings, make_job: MakeJob, load_job: LoadJob
) -> None:
    url = settings.database_url
    job_id = make_job()
    assert isinstance(jobstore.claim(url, job_id, ME, 60), Claim)
    garbage: list[str] = []
    for step in range(1, 6):
        ref = {"key": f"k{step}.pt", "preview_key": f"k{step}.png", "step": step}
        got = jobstore.append_checkpoint(url, job_id, 1, ref, 2)
        assert got is not None and got.ref == {**ref, "seq": step - 1}
        garbage += got.garbage
    assert [(c["step"], c["seq"]) for c in load_job(job_id).checkpoints] == [(4, 3), (5, 4)]
    assert garbage == ["k1.pt", "k1.png", "k2.pt", "k2.png", "k3.pt", "k3.png"]


def test_retain_numbers_legacy_refs_by_position_and_keeps_at_least_one() -> None:
    legacy = [{"key": "a.pt", "preview_key": "a.png"}, {"key": "b.pt", "preview_key": "b.png"}]
    refs, garbage = jobstore.retain(legacy, {"key": "c.pt", "preview_key": "c.png"}, 2)
    assert [(c["key"], c["seq"]) for c in refs] == [("b.pt", 1), ("c.pt", 2)]
    assert garbage == ["a.pt", "a.png"]
    refs, garbage = jobstore.retain(refs, {"key": "d.pt"}, 0)  # keep < 1: the latest stays
    assert [(c["key"], c["seq"]) for c in refs] == [("d.pt", 3)]
    assert garbage == ["b.pt", "b.png", "c.pt", "c.png"]
    assert jobstore.retain([], {"key": "x.pt"}, 3) == ([{"key": "x.pt", "seq": 0}], [])


def test_retain_never_names_a_key_a_kept_ref_still_uses() -> None:
    # A dropped ref sharing its preview with a kept one (and an earlier copy of the same key).
    current = [{"key": "1.pt", "preview_key": "p.png", "seq": 7}, {"key": "2.pt", "seq": 8}]
    refs, garbage = jobstore.retain(current, {"key": "2.pt", "preview_key": "p.png"}, 1)
    assert refs == [{"key": "2.pt", "preview_key": "p.png", "seq": 9}]
    assert garbage == ["1.pt"]


def test_a_pruned_refs_thumbnail_goes_with_it_and_refs_without_one_still_prune() -> None:
    # A ref of an earlier version (no thumb_key) next to refs that have one.
    legacy = {"key": "1.pt", "preview_key": "1.png", "seq": 0}
    new = [{"key": f"{s}.pt", "preview_key": f"{s}.png", "thumb_key": f"{s}.thumb.jpg"} for s in (2, 3)]
    refs, garbage = jobstore.retain([legacy, {**new[0], "seq": 1}], new[1], 1)
    assert refs == [{**new[1], "seq": 2}]
    assert garbage == ["1.pt", "1.png", "2.pt", "2.png", "2.thumb.jpg"]
    # A thumbnail a kept ref still names is never garbage.
    shared = {"key": "4.pt", "thumb_key": "3.thumb.jpg"}
    assert jobstore.retain(refs, shared, 1)[1] == ["3.pt", "3.png"]
