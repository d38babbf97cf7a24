"""Lose nothing: worker, broker and storage faults on real processes and real servers.

Every job must end ``succeeded`` exactly once (one ``succeeded`` event, one version of its result
object in a versioned bucket), and a job interrupted mid-run must resume from its last checkpoint.

Most tests share one module stack (``fault_stack``): a fresh PostgreSQL database on 127.0.0.1:5432,
a PRIVATE redis-server on a free port (killed and restarted empty by one test), moto's S3 server
behind a TCP proxy that can be cut (versioning on), the API, a dispatcher (``stylequeue dispatch
--interval 0.5``) and two workers ``a`` and ``b`` (``stylequeue worker --cpu``, one pool process each).
Short lease / heartbeat / requeue timeouts and a 1 s retry backoff come from STYLEQUEUE_* env. A test
that kills a worker starts it again, so the next test finds both workers running.

The embedded default (SQLite + kombu's SQL transport + a folder) has its own stack in its test.

Kill moments are random (after a first checkpoint, before the job's end); the seed is printed and
can be fixed with STYLEQUEUE_CHAOS_SEED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.models import Job
from shared.queue import make_celery, publish_job
from tests.support import chaos_lib, scenarios
from tests.support.chaos_lib import PrivateRedis, TcpProxy
from tests.support.servers import free_port, port_open, require, temporary_database
from tests.support.stacks import FAST_TIMING, Stack, make_key, stack_env, stack_settings, start
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 2 scales (24 and 48 px) x 50 iterations = 100 steps, a checkpoint every 10: ~5 s a job here.
JOB = {"size": 48, "min_size": 24, "scale_factor": 2, "iterations": 50}
TOTAL_STEPS = 100
FAST = FAST_TIMING
# Transient errors: retried after a random 0..min(3, 2**n) s (8 retries: ~10 s of outage covered).
RETRY_ENV = {"STYLEQUEUE_RETRY_BACKOFF_S": "1", "STYLEQUEUE_RETRY_BACKOFF_MAX_S": "3"}
TERMINAL = {"succeeded", "failed", "canceled"}
SEED = int(os.environ.get("STYLEQUEUE_CHAOS_SEED") or random.randrange(1 << 30))


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new database on the shared server (so no other stack's reconciler sees these jobs)."""
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    with temporary_database("sq_faults") as url:
        yield url


@dataclass
class FaultStack:
    stack: Stack
    workers: tuple[str, ...]
    rng: random.Random
    redis: PrivateRedis | None = None
    proxy: TcpProxy | None = None
    s3: Any = None  # a boto3 client straight to moto (never through the proxy)
    bucket: str = ""
    prefix: str = ""
    kills: list[str] = field(default_factory=list)

    # --- processes ---
    def ensure_running(self) -> None:
        if self.redis is not None and self.redis.proc is None:
            self.redis.start()
        if self.proxy is not None and self.proxy.is_cut:
            self.proxy.restore()
        for name in self.workers:
            proc = self.stack.procs.get(name)
            if proc is None or proc.poll() is not None:
                self.stack.procs.pop(name, None)
                self.stack.forget_ready(name)
                self.stack.start_worker(name=name, env={**self.stack.env, **RETRY_ENV})
        reconciler = self.stack.procs.get("reconcile")
        if reconciler is None or reconciler.poll() is not None:
            self.stack.procs["reconcile"] = start(
                ["dispatch", "--interval", "0.5"], self.stack.env, self.stack.log_of("reconcile")
            )

    def worker_of(self, job_id: str) -> str:
        """The worker whose pool process holds the job now."""
        pid = chaos_lib.holder_pid(self.stack.job(job_id).worker)
        for name in self.workers:
            proc = self.stack.procs.get(name)
            if proc is not None and pid in chaos_lib.pool_children(proc.pid):
                return name
        raise AssertionError(f"no running worker holds job {job_id} (pid {pid})")

    def kill_whole(self, name: str) -> None:
        chaos_lib.kill_whole_worker(self.stack.procs.pop(name))
        self.stack.forget_ready(name)
        self.kills.append(f"whole:{name}")

    def kill_pool_child(self, job_id: str) -> int:
        pid = chaos_lib.holder_pid(self.stack.job(job_id).worker)
        assert pid is not None
        chaos_lib.kill_pid(pid)
        self.kills.append(f"pool:{pid}")
        return pid

    # --- jobs ---
    def submit(self, images: dict[str, bytes], n: int = 1, params: dict[str, Any] | None = None) -> list[str]:
        contents = ("content_astronaut", "content_chelsea_cat")
        ids: list[str] = []
        while len(ids) < n:
            ids += scenarios.submit(self.stack, images, params or JOB, contents[: min(2, n - len(ids))])
        return ids

    def wait_checkpoint(
        self, job_id: str, attempt: int | None = None, after_step: int = 0, timeout: float = 60
    ) -> Job:
        """Until the job runs (under ``attempt``) with a checkpoint past ``after_step``."""

        def ready() -> Job | None:
            job = self.stack.job(job_id)
            assert job.status not in TERMINAL, (job.status, job.error_code, self.tails())
            ok = (
                job.status == "running"
                and job.checkpoints
                and job.checkpoints[-1]["step"] > after_step
                and (attempt is None or job.attempt == attempt)
            )
            return job if ok else None

        return wait_for(ready, timeout, f"job {job_id} to run past a checkpoint", interval=0.02)

    def random_moment(self, job_id: str, attempt: int | None = None, after_step: int = 0) -> Job:
        """Wait for a checkpoint past ``after_step`` (one of this attempt's own when ``after_step`` is
        where it resumed), then a random moment before the job ends; the row then."""
        self.wait_checkpoint(job_id, attempt, after_step)
        time.sleep(self.rng.uniform(0.0, 0.3))  # well before the end, even on a loaded machine
        job = self.stack.job(job_id)
        assert job.status == "running" and job.progress.get("step", 0) < TOTAL_STEPS, (
            "the job ended before the kill: make it longer",
            job.status,
            job.progress,
        )
        return job

    def last_checkpoint(self, job_id: str) -> int:
        return int(self.stack.job(job_id).checkpoints[-1]["step"])

    def checkpoint_after_requeue(self, job_id: str) -> int:
        """The last checkpoint once the reconciler has requeued the job of a killed worker: the
        dead attempt can write no more by then (checkpoints are recorded by a background thread,
        whose last commit may still land just after the kill)."""
        wait_for(lambda: self.stack.job(job_id).status == "queued", 60, f"{job_id} requeued", interval=0.1)
        return self.last_checkpoint(job_id)

    def wait_terminal(self, job_ids: list[str], timeout: float = 90) -> None:
        def done() -> bool:
            return all(self.stack.job(j).status in TERMINAL for j in job_ids)

        try:
            wait_for(done, timeout, f"jobs {job_ids} to end", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def logs(self) -> list[Path]:
        return [self.stack.log_of(n) for n in self.workers]

    def events(self, job_id: str) -> list[chaos_lib.Event]:
        return chaos_lib.job_events(self.logs(), job_id)

    def tails(self) -> str:
        return "\n".join(
            f"--- {n} (seed {SEED}) ---\n{self.stack.log_tail(30, name=n)}"
            for n in (*self.workers, "reconcile")
        )

    def result_versions(self, result_key: str) -> int:
        return chaos_lib.versions(self.s3, self.bucket, f"{self.prefix}/{result_key}")

    def assert_succeeded_once(self, job_id: str, attempt: int, resumed_from: int | None) -> Job:
        """Succeeded, exactly once, under ``attempt``; that attempt resumed from ``resumed_from``."""
        job = self.stack.job(job_id)
        # The worker logs "succeeded" just after the row's commit: on a loaded machine the line may
        # not be in its log yet when the status is read, so wait for the event, not for time.
        with contextlib.suppress(AssertionError):  # the assertions below report it with the logs
            wait_for(
                lambda: chaos_lib.count(self.events(job_id), "succeeded") >= 1,
                30,
                f"the succeeded event of {job_id} in the worker logs",
                interval=0.1,
            )
        events = self.events(job_id)
        context = f"seed={SEED} kills={self.kills}\n{self.tails()}"
        assert job.status == "succeeded", (job.status, job.error_code, job.error_message, context)
        assert job.attempt == attempt, (job.attempt, context)
        assert chaos_lib.count(events, "succeeded") == 1, context
        assert [e.attempt for e in events if e.event == "succeeded"] == [attempt], context
        resumes = [e.int("step") for e in events if e.event == "resuming" and e.attempt == attempt]
        if resumed_from is None:
            assert resumes == [], context
        else:
            assert resumes == [resumed_from], (resumes, resumed_from, context)
            later = [c["step"] for c in job.checkpoints if c["step"] > resumed_from]
            assert later and later[-1] == TOTAL_STEPS, job.checkpoints  # it went on from there
        assert job.result_key == f"jobs/{job_id}/result.a{attempt}.png"
        assert scenarios.result_keys(self.stack, job_id) == [job.result_key], context  # one object
        if self.s3 is not None:
            assert self.result_versions(job.result_key) == 1, context
        else:
            assert self.stack.storage().exists(job.result_key)
        return job


@pytest.fixture(scope="module")
def fault_stack(_moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    require(PrivateRedis.available(), "redis-server is not installed (needed for a private Redis)")
    from shared.migrate import upgrade

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    tmp = tmp_path_factory.mktemp("fault-stack")
    redis = PrivateRedis(tmp / "redis", free_port())
    redis.start()
    moto_port = int(_moto_server.rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port).start()
    s3 = chaos_lib.s3_client(_moto_server)
    bucket = f"sq-faults-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    chaos_lib.enable_versioning(s3, bucket)
    with fresh_pg_database() as db_url:
        env = stack_env(
            tmp,
            database_url=db_url,
            broker_url=redis.url(),
            storage_url=f"s3://{bucket}/sq",
            s3_endpoint_url=proxy.url,
            **FAST,
        )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            env[name] = os.environ[name]
        stack = Stack("faults", env, stack_settings(env), tmp)
        upgrade(stack.settings.database_url)
        fs = FaultStack(stack, ("a", "b"), random.Random(SEED), redis, proxy, s3, bucket, "sq")
        print(f"\nfault tests: STYLEQUEUE_CHAOS_SEED={SEED}")
        try:
            fs.ensure_running()
            stack.start_api()
            stack.key = make_key(stack.settings)
            yield fs
        finally:
            stack.close()
            proxy.close()
            redis.kill()


@pytest.fixture
def fs(fault_stack: FaultStack) -> FaultStack:
    fault_stack.ensure_running()
    fault_stack.kills.clear()
    return fault_stack


# 1a ------------------------------------------------------------------------------------------


def test_kill9_whole_worker_mid_job_resumes_from_last_checkpoint(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """kill -9 of the whole worker (Celery main + pool child) at random moments; new workers start.
    The message stays unacknowledged in the dead worker's kombu state (restored only after the
    visibility timeout): the reconciler requeues the job once its lease expires."""
    jobs = fs.submit(images, 2)
    for job_id in jobs:  # both workers die (one after the other) before new ones start
        fs.random_moment(job_id)
        fs.kill_whole(fs.worker_of(job_id))
    resumed_from = {job_id: fs.checkpoint_after_requeue(job_id) for job_id in jobs}
    fs.ensure_running()  # new workers
    fs.wait_terminal(jobs)
    for job_id in jobs:
        fs.assert_succeeded_once(job_id, attempt=2, resumed_from=resumed_from[job_id])
    republished = chaos_lib.job_events([fs.stack.log_of("reconcile")])
    for job_id in jobs:  # it was the dispatcher's reconcile step that brought them back
        assert any(e.job_id == job_id and e.event == "lease_expired" for e in republished)


# 1b ------------------------------------------------------------------------------------------


def test_kill9_pool_child_mid_job_resumes_from_last_checkpoint(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """kill -9 of ONLY the pool process, at random moments, twice for one job: Celery rejects the
    message on worker loss, Redis redelivers it at once, a pool process claims attempt n+1 (the
    holder is dead on this host) and resumes. The workers themselves live on."""
    first, second = fs.submit(images, 2)
    resumed: dict[str, list[int]] = {first: [], second: []}
    for job_id, attempt in ((first, 1), (second, 1), (first, 2)):
        fs.random_moment(job_id, attempt, after_step=(resumed[job_id] or [0])[-1])
        fs.kill_pool_child(job_id)
        resumed[job_id].append(fs.last_checkpoint(job_id))
    fs.wait_terminal([first, second])
    fs.assert_succeeded_once(first, attempt=3, resumed_from=resumed[first][-1])
    fs.assert_succeeded_once(second, attempt=2, resumed_from=resumed[second][-1])
    events = fs.events(first)
    assert [e.int("step") for e in events if e.event == "resuming" and e.attempt == 2] == resumed[first][:1]
    assert all(fs.stack.procs[n].poll() is None for n in fs.workers)


# 2 -------------------------------------------------------------------------------------------


def test_redis_restarted_empty_with_jobs_queued_and_running_all_complete(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """The broker is killed and restarted with nothing in it while two jobs run and two wait: the
    workers reconnect, the running jobs finish, the reconciler publishes the lost queued ones again."""
    assert fs.redis is not None
    jobs = fs.submit(images, 4)
    wait_for(lambda: sum(fs.stack.job(j).status == "running" for j in jobs) == 2, 30, "two running")
    running = [j for j in jobs if fs.stack.job(j).status == "running"]
    queued = [j for j in jobs if j not in running]
    for job_id in running:
        fs.wait_checkpoint(job_id)
    assert all(fs.stack.job(j).status == "queued" for j in queued)
    fs.redis.restart_empty(down_s=1.0)
    fs.kills.append("redis")
    fs.wait_terminal(jobs, timeout=120)
    for job_id in running:
        fs.assert_succeeded_once(job_id, attempt=1, resumed_from=None)
    for job_id in queued:
        fs.assert_succeeded_once(job_id, attempt=1, resumed_from=None)
    for name in fs.workers:  # each worker lost the broker and connected again
        text = fs.stack.log_of(name).read_text()
        lost = text.rfind("Connection to broker lost")
        assert lost >= 0 and f"127.0.0.1:{fs.redis.port}/0" in text[lost:].split("Connected to", 1)[1], (
            fs.tails()
        )


# 4 -------------------------------------------------------------------------------------------

STORAGE_OUTAGE_S = 3.0


def test_storage_unreachable_during_job_completes_after_it_returns(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """S3 (moto behind a TCP proxy) is unreachable for 3 s mid-job. Checkpoints are uploaded in the
    background (worker.checkpoints): a failed upload is logged and the job runs on, so either it
    runs through the outage (``checkpoint_failed``, done on attempt 1), or something it needs on
    the job's own thread (an input, the result) fails: the job is given back and retried with
    backoff (up to 3 s in tests) until storage returns, then resumes from its last checkpoint. Either
    way it completes with one result object, and transient hand-backs use up no attempt."""
    assert fs.proxy is not None
    job_id = fs.submit(images, 1)[0]
    fs.random_moment(job_id)
    fs.proxy.cut()
    fs.kills.append("storage")
    time.sleep(STORAGE_OUTAGE_S)
    before_restore = fs.stack.job(job_id)
    fs.proxy.restore()
    fs.wait_terminal([job_id], timeout=120)
    events = fs.events(job_id)
    failed_uploads = chaos_lib.count(events, "checkpoint_failed")
    handed_back = chaos_lib.count(events, "transient_error")
    assert failed_uploads + handed_back >= 1, fs.tails()  # the outage was felt
    assert before_restore.status != "succeeded"
    job = fs.stack.job(job_id)
    if not handed_back:
        fs.assert_succeeded_once(job_id, attempt=1, resumed_from=None)
        return
    resumes = [e.int("step") for e in events if e.event == "resuming" and e.attempt == job.attempt]
    assert resumes and resumes[0] == before_restore.checkpoints[-1]["step"], (resumes, fs.tails())
    fs.assert_succeeded_once(job_id, attempt=job.attempt, resumed_from=resumes[0])
    assert job.attempt == handed_back + 1 and job.max_attempts == FAST["max_attempts"] + handed_back


# 5 -------------------------------------------------------------------------------------------


def test_same_job_delivered_twice_at_once_runs_once(fs: FaultStack, images: dict[str, bytes]) -> None:
    """Two idle workers, the job published twice back to back (the API's publish and ours): both
    deliveries arrive together; one claims (guarded UPDATE), the other is dropped. One execution,
    one ``succeeded`` event, one version of the result object."""
    wait_for(lambda: all(fs.stack.job(j).status in TERMINAL for j in _all_jobs(fs)), 60, "idle")
    app = make_celery(fs.stack.settings)
    job_id = fs.submit(images, 1, {**JOB, "iterations": 40})[0]
    publish_job(app, job_id)
    fs.wait_terminal([job_id])
    fs.assert_succeeded_once(job_id, attempt=1, resumed_from=None)
    events = fs.events(job_id)
    assert chaos_lib.count(events, "claimed") == 1, fs.tails()
    wait_for(lambda: [e for e in fs.events(job_id) if e.event == "dropped"], 10, "the duplicate dropped")
    dropped = [e.fields.get("reason") for e in fs.events(job_id) if e.event == "dropped"]
    # Dropped while the job ran (or lost the claim race), not after it ended: really at once.
    assert len(dropped) == 1 and dropped[0] in {"running_elsewhere", "lost_race"}, dropped
    # Both workers saw one delivery each (the two messages went to the two idle workers).
    sources = {e.source for e in fs.events(job_id) if e.event in ("claimed", "dropped")}
    assert len(sources) == 2, sources


def _all_jobs(fs: FaultStack) -> list[str]:
    from shared.db import get_sessionmaker

    with get_sessionmaker(fs.stack.settings.database_url)() as s:
        return [j.id for j in s.query(Job).all()]


# 6 -------------------------------------------------------------------------------------------


def test_sigterm_writes_a_checkpoint_and_another_worker_finishes(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """SIGTERM (warm shutdown) mid-job: the job is checkpointed at the iteration it was in, handed
    back (its attempt not counted) and resumed from THAT checkpoint by the other worker."""
    job_id = fs.submit(images, 1)[0]
    fs.random_moment(job_id)
    owner = fs.worker_of(job_id)
    other = next(n for n in fs.workers if n != owner)
    assert fs.stack.stop_worker(owner) == 0  # SIGTERM to `stylequeue worker`
    events = fs.events(job_id)
    steps = [e.int("step") for e in events if e.event == "checkpoint" and e.attempt == 1]
    shutdown_ckpt = [
        e.int("step")
        for e in events
        if e.event == "checkpoint" and e.attempt == 1 and e.fields.get("reason") == "shutdown"
    ]
    handed = [e for e in events if e.event == "handed_back" and e.attempt == 1]
    assert steps and len(handed) == 1, fs.tails()
    # Handed back at its latest checkpoint: the one written for the shutdown, or, when SIGTERM
    # came while a periodic checkpoint was being written, that one (it is at the same iteration).
    assert handed[0].int("checkpoint_step") == steps[-1], fs.tails()
    assert shutdown_ckpt in ([], [steps[-1]]), fs.tails()
    fs.wait_terminal([job_id])
    job = fs.assert_succeeded_once(job_id, attempt=2, resumed_from=steps[-1])
    assert job.max_attempts == FAST["max_attempts"] + 1  # a hand-back does not use up an attempt
    with fs.stack.client() as c:
        shown = c.get_job(job_id)
    assert (shown["attempts"], shown["handed_back"]) == (1, 1)  # and the API does not show it as used
    claimed = [e for e in fs.events(job_id) if e.event == "claimed" and e.attempt == 2]
    assert [e.source for e in claimed] == [fs.stack.log_of(other).name]


# 7 -------------------------------------------------------------------------------------------


def test_job_whose_worker_dies_every_attempt_fails_worker_lost_with_checkpoints_kept(
    fs: FaultStack, images: dict[str, bytes]
) -> None:
    """The pool process running the job is killed (-9) in every attempt, each time after the attempt
    wrote a checkpoint of its own: after max_attempts (3) the next delivery fails the job
    ``worker_lost`` instead of looping forever; every checkpoint is kept."""
    job_id = fs.submit(images, 1)[0]
    after = 0
    for attempt in (1, 2, 3):
        fs.wait_checkpoint(job_id, attempt, after_step=after)
        after = fs.last_checkpoint(job_id)
        fs.kill_pool_child(job_id)
        after = fs.last_checkpoint(job_id)
    fs.wait_terminal([job_id], timeout=60)
    job = fs.stack.job(job_id)
    assert (job.status, job.error_code, job.attempt) == ("failed", "worker_lost", 3), fs.tails()
    events = fs.events(job_id)
    assert chaos_lib.count(events, "succeeded") == 0 and job.result_key is None
    assert sorted(e.attempt or 0 for e in events if e.event == "resuming") == [2, 3]
    assert job.checkpoints and job.checkpoints[-1]["step"] == after
    storage = fs.stack.storage()
    for ref in job.checkpoints:
        assert storage.exists(ref["key"]) and storage.exists(ref["preview_key"])


# 3 -------------------------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[FaultStack]:
    env = stack_env(tmp_path, **FAST)
    stack = Stack("embedded", env, stack_settings(env), tmp_path)
    fs = FaultStack(stack, ("worker",), random.Random(SEED))
    try:
        fs.ensure_running()
        stack.start_api()
        stack.key = make_key(stack.settings)
        yield fs
    finally:
        stack.close()


def test_embedded_default_whole_worker_killed_mid_job_completes(
    embedded: FaultStack, images: dict[str, bytes]
) -> None:
    """SQLite + kombu's SQL transport + a folder: kill -9 of the whole worker loses the message for
    good (the SQL transport has no visibility timeout); the reconciler requeues the job when its
    lease expires and the restarted worker resumes it from its last checkpoint."""
    fs = embedded
    job_id = fs.submit(images, 1)[0]
    fs.random_moment(job_id)
    fs.kill_whole("worker")
    resumed_from = fs.checkpoint_after_requeue(job_id)
    fs.ensure_running()
    fs.wait_terminal([job_id], timeout=90)
    fs.assert_succeeded_once(job_id, attempt=2, resumed_from=resumed_from)
    # one result and its thumbnail: the killed attempt's objects (if it got that far) are gone
    assert scenarios.result_keys(fs.stack, job_id) == [f"jobs/{job_id}/result.a2.png"]
    assert scenarios.result_thumb_keys(fs.stack, job_id) == [f"jobs/{job_id}/result.a2.thumb.jpg"]
