"""Chaos run: N jobs through real processes while workers are killed -9 at random moments (and, if
asked, Redis is restarted empty and the dispatcher killed -9).

    .venv/bin/python bench/chaos.py --jobs 50 --kills 20 [--redis-restarts 2] [--dispatcher-kills 2]
        [--publish-grace 5] [--seed 1] [--timeout 540] [--keep]

Against real servers, all on loopback: a fresh PostgreSQL database on 127.0.0.1:5432 (created here
and dropped afterwards), a private redis-server on a free port (or, without redis-server, the shared
Redis on 127.0.0.1:6379 with an empty random DB index), moto's S3 server in this process with bucket
versioning on. Subprocesses: ``stylequeue api``, two ``stylequeue worker --cpu`` (one pool process
each) and ``stylequeue dispatch --interval 1``. Tiny jobs (16 and 32 px, ``--iterations`` per scale,
a checkpoint every 10), random weights, short lease / heartbeat timeouts and a short
``STYLEQUEUE_PUBLISH_GRACE_S`` (``--publish-grace``, 5 s: a message lost with Redis is sent again after
it), no rate limit.

The N jobs are submitted as one batch over HTTP. Then K kills at random moments, alternating
(1) the WHOLE worker running a randomly chosen running job (kill -9 of the Celery main process's group
and its supervisor; restarted at once) and (2) ONLY the pool process running a randomly chosen job.
Mixed in at random positions of that sequence: ``--redis-restarts`` restarts of the private
redis-server EMPTY (kill -9, no persistence, down for 0-1 s: every message and every unacked delivery is
gone; needs ``redis-server``), and ``--dispatcher-kills`` kill -9 of the dispatcher (started again at
once). The run ends when every job is terminal (or at ``--timeout``). The last line printed is:

    jobs=N succeeded=S failed=F lost=L duplicates=D kills=K redis_restarts=RR dispatcher_kills=DK
        resumed=R recomputed_iterations=I

* ``lost``: jobs not terminal at the end, plus succeeded jobs whose result object is missing;
* ``duplicates``: jobs with more than one visible result object (each attempt writes its own key and
  deletes superseded ones), a result key written more than once (versions), or more than one
  ``succeeded`` event in the workers' logs;
* ``kills``: worker kills actually performed (fewer than asked if the jobs all ended first; a line
  says so); ``redis_restarts``, ``dispatcher_kills``: the other faults performed;
* ``resumed``: jobs whose final attempt started from a checkpoint (``started resume_step>0``);
* ``recomputed_iterations``: iterations executed more than once, summed over jobs and consecutive
  attempts: ``max(0, last_step(a) - resume_step(a+1))``. ``resume_step`` is exact (the worker logs
  it). ``last_step(a)`` is the largest of: the attempt's last logged checkpoint, its hand-back
  checkpoint, the job's total if it succeeded, and, for an attempt this script killed, the
  ``progress.step`` in the job row read right after the kill (the watcher writes it every
  ``progress_interval_s`` = 0.1 s, and the next attempt cannot overwrite it that soon). So the figure is
  a LOWER bound: per killed attempt it misses the iterations done in the last <= 0.1 s before the kill
  (about 1-3 at these sizes), and attempts that ended some other way (a transient error) count only up
  to their last checkpoint.

Failed jobs are expected when one job happens to be killed in all of its ``max_attempts`` (3)
attempts: it ends ``failed``/``worker_lost`` (by design, not a loss).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.storage_keys import THUMB_SUFFIX  # noqa: E402
from tests.support import chaos_lib  # noqa: E402
from tests.support.chaos_lib import PrivateRedis  # noqa: E402
from tests.support.servers import temporary_database  # noqa: E402
from tests.support.stacks import start, stop  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}
WORKERS = ("w0", "w1")
# Short timeouts, so that a killed worker's job runs again within seconds (the chaos run only)
FAST = dict(
    progress_interval_s=0.1,
    heartbeat_s=0.3,
    lease_s=4,
    dispatch_interval_s=1,
    checkpoint_every=10,
    max_attempts=3,
    retry_backoff_s=1,
    retry_backoff_max_s=3,
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def broker(tmp: Path) -> Iterator[tuple[str, PrivateRedis | None]]:
    """The broker URL, and the private redis-server behind it (None: the shared Redis, which this
    script must not restart)."""
    if PrivateRedis.available():
        redis = PrivateRedis(tmp / "redis", free_port())
        redis.start()
        try:
            yield redis.url(), redis
        finally:
            redis.kill()
        return
    import redis as redis_py

    for _ in range(50):  # the shared server: an empty DB index nobody uses now
        db = random.randrange(1, 16)
        client = redis_py.Redis(host="127.0.0.1", port=6379, db=db)
        if client.dbsize() == 0:
            try:
                yield f"redis://127.0.0.1:6379/{db}", None
            finally:
                client.flushdb()
                client.close()
            return
    raise SystemExit("no empty DB index on the shared Redis")


@contextmanager
def moto_s3() -> Iterator[tuple[str, Any, str]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = chaos_lib.s3_client(url)
    bucket = f"sq-chaos-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    chaos_lib.enable_versioning(client, bucket)
    try:
        yield url, client, bucket
    finally:
        server.stop()


def png(i: int, edge: int = 40) -> bytes:
    from PIL import Image

    rnd = random.Random(i)
    im = Image.new("RGB", (edge, edge), (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    for _ in range(30):
        x, y = rnd.randrange(edge), rnd.randrange(edge)
        im.putpixel((x, y), (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def service_env(
    tmp: Path, database_url: str, broker_url: str, s3_url: str, bucket: str, **values: Any
) -> dict[str, str]:
    """The environment of every process: the servers, random weights on the CPU, auth on, no rate
    limit, a queue of its own; ``values`` are further settings (``STYLEQUEUE_<NAME>``). A setting not
    named keeps its default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    settings: dict[str, Any] = dict(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=f"s3://{bucket}/sq",
        s3_endpoint_url=s3_url,
        data_dir=tmp / "data",
        weights="random",
        device="cpu",
        auth="on",
        rate_limit="",  # the bench polls and submits faster than the default per-key limit
        queue_name=f"bench-{uuid.uuid4().hex[:6]}",
    )
    settings.update(values)
    env.update({f"STYLEQUEUE_{k.upper()}": str(v) for k, v in settings.items()})
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return env


@dataclass
class Killed:
    job_id: str
    attempt: int
    step: int  # progress.step in the row right after the kill


@dataclass
class Chaos:
    env: dict[str, str]
    tmp: Path
    database_url: str
    rng: random.Random
    workers: tuple[str, ...] = WORKERS
    redis: PrivateRedis | None = None  # the private redis-server, if there is one
    dispatch_args: tuple[str, ...] = ("dispatch", "--interval", "1")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: list[Killed] = field(default_factory=list)
    kills: int = 0
    redis_restarts: int = 0
    dispatcher_kills: int = 0
    job_ids: list[str] = field(default_factory=list)

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start_workers(self, names: Iterable[str]) -> None:
        """Start the workers at once, then wait until each is ready (a NEW "ready." in its log)."""
        names = list(names)
        for name in names:
            log = self.log(name)
            if log.exists():
                log.write_text(log.read_text().replace(" ready.", " was ready."))
            self.procs[name] = self._worker_process(name, log)
        for name in names:
            self._wait_ready(name)

    def _worker_process(self, name: str, log: Path) -> subprocess.Popen[bytes]:
        """``stylequeue worker --cpu`` (both workers are node ``cpu@<host>``; each registers its own
        ``workers`` row, ``node#pid``)."""
        return start(["worker", "--cpu", "--loglevel", "info"], self.env, log)

    def _wait_ready(self, name: str) -> None:
        proc, log = self.procs[name], self.log(name)
        wait_for(lambda: proc.poll() is not None or " ready." in log.read_text(), 90, f"worker {name}")
        if proc.poll() is not None:
            raise SystemExit(f"worker {name} exited: {log.read_text()[-2000:]}")

    def start_worker(self, name: str) -> None:
        self.start_workers([name])

    def start_dispatcher(self) -> None:
        self.procs["dispatch"] = start(list(self.dispatch_args), self.env, self.log("dispatch"))

    def kill_dispatcher(self) -> None:
        """kill -9 the dispatcher (mid-pass or asleep), then start it again at once."""
        proc = self.procs.pop("dispatch")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (stacks.start)
        proc.wait(10)
        self.start_dispatcher()
        self.dispatcher_kills += 1

    def restart_redis(self, down_s: float) -> None:
        """Restart the private redis-server EMPTY: every message and unacked delivery is gone."""
        if self.redis is None:
            raise SystemExit("restarting Redis needs the private redis-server (not found on PATH)")
        self.redis.restart_empty(down_s)
        self.redis_restarts += 1

    def rows(self, ids: Iterable[str] | None = None) -> list[Any]:
        """The job rows (only those of ``ids`` if given): status, holder, progress and times."""
        from sqlalchemy import select

        from shared.db import get_sessionmaker
        from shared.models import Job

        columns = (Job.id, Job.tenant_id, Job.batch_id, Job.status, Job.attempt, Job.worker, Job.progress)
        times = (Job.created_at, Job.published_at, Job.started_at, Job.finished_at)
        query = select(*columns, *times)
        if ids is not None:
            query = query.where(Job.id.in_(list(ids)))
        with get_sessionmaker(self.database_url)() as s:
            return list(s.execute(query).all())

    def owner(self, pid: int | None) -> str | None:
        for name in self.workers:
            proc = self.procs.get(name)
            if pid is not None and proc is not None and pid in chaos_lib.pool_children(proc.pid):
                return name
        return None

    def kill_one(self, whole: bool) -> bool:
        """Kill the worker (or pool process) running a random running job; False if none runs."""
        running = [r for r in self.rows() if r.status == "running"]
        self.rng.shuffle(running)
        for row in running:
            pid = chaos_lib.holder_pid(row.worker)
            name = self.owner(pid)
            if name is None or pid is None or not chaos_lib.alive(pid):
                continue  # a dead holder not yet requeued (maybe not yet reaped), or a worker restarting
            victims = (
                [r for r in running if self.owner(chaos_lib.holder_pid(r.worker)) == name] if whole else [row]
            )
            if whole:
                chaos_lib.kill_whole_worker(self.procs.pop(name))
            else:
                chaos_lib.kill_pid(pid)
            after = {r.id: r for r in self.rows()}
            for v in victims:
                now = after[v.id]
                step = int((now.progress or {}).get("step") or 0)
                self.killed.append(Killed(v.id, v.attempt, step))
            self.kills += 1
            print(
                f"kill {self.kills}: {'whole worker ' + name if whole else f'pool process {pid}'} "
                f"(jobs {[v.id[:8] for v in victims]})",
                flush=True,
            )
            if whole:
                self.start_worker(name)
            return True
        return False

    def fault(self, kind: str) -> bool:
        """One fault of the plan (``fault_plan``); False when it cannot be made now (no job runs)."""
        if kind == "redis":
            down = self.rng.uniform(0, 1)
            self.restart_redis(down)
            print(f"redis restart {self.redis_restarts}: empty, down {down:.1f}s", flush=True)
            return True
        if kind == "dispatcher":
            self.kill_dispatcher()
            print(f"dispatcher kill {self.dispatcher_kills}: kill -9, started again", flush=True)
            return True
        return self.kill_one(whole=kind == "whole")


def fault_plan(rng: random.Random, kills: int, redis_restarts: int, dispatcher_kills: int) -> list[str]:
    """Worker kills alternating whole / pool process, the other faults inserted at random places."""
    plan = ["whole" if i % 2 == 0 else "pool" for i in range(kills)]
    for kind, n in (("redis", redis_restarts), ("dispatcher", dispatcher_kills)):
        for _ in range(n):
            plan.insert(rng.randrange(len(plan) + 1), kind)
    return plan


def start_services(chaos: Chaos, tenants: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Migrate, make one API key per tenant, start the API, the dispatcher and the workers; the API's
    base URL and the keys by tenant."""
    import httpx

    from shared.db import get_sessionmaker
    from shared.migrate import upgrade
    from shared.tenants import create_key

    upgrade(chaos.database_url)
    with get_sessionmaker(chaos.database_url)() as s:
        keys = {name: create_key(s, name).key for name in tenants}
        s.commit()
    port = free_port()
    chaos.procs["api"] = start(["api", "--port", str(port)], chaos.env, chaos.log("api"))
    chaos.start_dispatcher()
    chaos.start_workers(chaos.workers)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the API", interval=0.2)
    return base, keys


def submit_batch(base: str, key: str, n: int, params: dict[str, Any], seed: int = 0) -> tuple[str, list[str]]:
    """Upload ``n`` distinct contents and one style, submit them as one batch: (batch id, job ids)."""
    from api.client import StyleQueueClient

    with StyleQueueClient(base, key, timeout=60) as c:
        contents = [str(c.upload_image(png(seed + i), f"c{i}.png")["id"]) for i in range(n)]
        style = str(c.upload_image(png(seed + 10_000, 48), "style.png")["id"])
        batch = c.submit_batch(contents, [style], params=params)
        return str(batch["id"]), [str(j["id"]) for j in c.list_jobs(batch_id=batch["id"])]


def stop_all(chaos: Chaos) -> None:
    for proc in chaos.procs.values():
        stop(proc)


def _result_versions(s3: Any, bucket: str, prefix: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per job: result objects still visible (the latest version of a key that is not deleted), and
    the most times one result key was written (an overwrite is a second, different result)."""
    live: dict[str, int] = {}
    writes: dict[str, dict[str, int]] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=f"{prefix}/jobs/"):
        for v in page.get("Versions", []):
            name = v["Key"].rsplit("/", 1)[-1]
            if name.startswith("result.") and not name.endswith(THUMB_SUFFIX):  # results, not thumbnails
                job_id = v["Key"].split("/")[-2]
                live[job_id] = live.get(job_id, 0) + int(bool(v["IsLatest"]))
                per_key = writes.setdefault(job_id, {})
                per_key[v["Key"]] = per_key.get(v["Key"], 0) + 1
    versions = {j: max(live.get(j, 0), max(k.values(), default=0)) for j, k in writes.items()}
    return live, versions


def _attempts(
    evs: list[chaos_lib.Event], killed: dict[tuple[str, int], int], job_id: str, total_steps: int
) -> tuple[dict[int, int], dict[int, int]]:
    """Per attempt of one job: the step it resumed from, and the last step it is known to have done."""
    resume: dict[int, int] = {}
    last: dict[int, int] = {}
    done_at = {"checkpoint": "step", "handed_back": "checkpoint_step"}
    for e in evs:
        if e.attempt is None:
            continue
        if e.event == "started":
            resume[e.attempt] = e.int("resume_step") or 0
        elif e.event in done_at:
            last[e.attempt] = max(last.get(e.attempt, 0), e.int(done_at[e.event]) or 0)
        elif e.event == "succeeded":
            last[e.attempt] = total_steps
    for (jid, attempt), step in killed.items():
        if jid == job_id:
            last[attempt] = max(last.get(attempt, 0), step)
    return resume, last


def measure(
    chaos: Chaos, s3: Any, bucket: str, prefix: str, total_steps: int, job_ids: list[str]
) -> dict[str, int]:
    rows = {r.id: r for r in chaos.rows()}
    by_job: dict[str, list[chaos_lib.Event]] = {}
    for e in chaos_lib.job_events([chaos.log(n) for n in chaos.workers]):
        by_job.setdefault(e.job_id, []).append(e)
    live, versions = _result_versions(s3, bucket, prefix)
    killed: dict[tuple[str, int], int] = {}
    for k in chaos.killed:
        killed[(k.job_id, k.attempt)] = max(killed.get((k.job_id, k.attempt), 0), k.step)
    succeeded = failed = lost = duplicates = resumed = recomputed = 0
    for job_id in job_ids:
        row, evs = rows[job_id], by_job.get(job_id, [])
        if row.status == "succeeded":
            succeeded += 1
            lost += int(live.get(job_id, 0) == 0)
        elif row.status in TERMINAL:
            failed += 1
        else:
            lost += 1
        duplicates += int(versions.get(job_id, 0) > 1 or chaos_lib.count(evs, "succeeded") > 1)
        resume, last = _attempts(evs, killed, job_id, total_steps)
        resumed += int(resume.get(row.attempt, 0) > 0)
        recomputed += sum(
            max(0, done - resume[attempt + 1]) for attempt, done in last.items() if attempt + 1 in resume
        )
    return dict(
        jobs=len(job_ids),
        succeeded=succeeded,
        failed=failed,
        lost=lost,
        duplicates=duplicates,
        kills=chaos.kills,
        redis_restarts=chaos.redis_restarts,
        dispatcher_kills=chaos.dispatcher_kills,
        resumed=resumed,
        recomputed_iterations=recomputed,
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--kills", type=int, default=20, help="worker kills (whole worker / pool process)")
    ap.add_argument("--redis-restarts", type=int, default=0, help="restarts of Redis, empty")
    ap.add_argument("--dispatcher-kills", type=int, default=0, help="kill -9 of the dispatcher")
    ap.add_argument("--publish-grace", type=float, default=5, help="STYLEQUEUE_PUBLISH_GRACE_S (s)")
    ap.add_argument("--seed", type=int, default=None, help="seed for fault timing and targets")
    ap.add_argument("--iterations", type=int, default=30, help="iterations per scale (2 scales)")
    ap.add_argument("--timeout", type=float, default=540, help="seconds to wait for every job")
    ap.add_argument("--keep", action="store_true", help="keep the logs folder")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="sq-chaos-"))
    params = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": args.iterations}
    total_steps = 2 * args.iterations
    t0 = time.monotonic()
    with (
        temporary_database("sq_chaos") as db_url,
        broker(tmp) as (broker_url, redis),
        moto_s3() as (s3_url, s3, bucket),
    ):
        if args.redis_restarts and redis is None:
            raise SystemExit(
                "--redis-restarts needs redis-server on PATH (the shared Redis is not restarted)"
            )
        env = service_env(tmp, db_url, broker_url, s3_url, bucket, publish_grace_s=args.publish_grace, **FAST)
        chaos = Chaos(env, tmp, db_url, rng, redis=redis)
        try:
            run(chaos, args, params, t0)
            figures = measure(chaos, s3, bucket, "sq", total_steps, chaos.job_ids)
        finally:
            stop_all(chaos)
    asked = dict(kills=args.kills, redis_restarts=args.redis_restarts, dispatcher_kills=args.dispatcher_kills)
    for name, n in asked.items():
        if figures[name] < n:
            print(f"note: only {figures[name]} of {n} {name} were made before every job ended")
    print(f"logs: {tmp}" if args.keep else "(logs removed; --keep keeps them)", flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wall={time.monotonic() - t0:.0f}s")
    print(" ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    return 0


def run(chaos: Chaos, args: argparse.Namespace, params: dict[str, Any], t0: float) -> None:
    base, keys = start_services(chaos, ["chaos"])
    _, chaos.job_ids = submit_batch(base, keys["chaos"], args.jobs, params)
    print(f"submitted {len(chaos.job_ids)} jobs in one batch after {time.monotonic() - t0:.0f}s", flush=True)
    plan = fault_plan(chaos.rng, args.kills, args.redis_restarts, args.dispatcher_kills)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rows = chaos.rows(chaos.job_ids)
        left = [r for r in rows if r.status not in TERMINAL]
        if not left:
            break
        if not plan:
            time.sleep(0.5)
            continue
        done = [r for r in rows if r.status == "succeeded" and r.started_at and r.finished_at]
        per_job = (
            3.0 if not done else sum((r.finished_at - r.started_at).total_seconds() for r in done) / len(done)
        )
        # Spread the faults left over about the first half of the work left (a random gap with
        # this mean), so that they all land while many jobs are still in flight.
        gap = max(0.4, (len(left) * per_job / len(chaos.workers)) / (len(plan) + 1))
        time.sleep(chaos.rng.uniform(0.2, gap))
        if chaos.fault(plan[0]):
            plan.pop(0)
    print(
        f"all terminal after {time.monotonic() - t0:.0f}s"
        if time.monotonic() < deadline
        else f"timeout after {args.timeout:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
