"""Fair dispatch and recovery figures, measured on a real stack (not a test):

    .venv/bin/python bench/fairness.py [--a-jobs 200] [--b-jobs 5] [--workers 2] [--iterations 20]
        [--idle-jobs 20] [--phases fair,idle,redis,kill] [--redis-down 0] [--quick]
        [--keep] [--seed N]

The stack is bench/chaos.py's (``start_services``): a fresh PostgreSQL database, a private
redis-server, moto's S3 server, ``stylequeue api``, ``--workers`` x ``stylequeue worker --cpu`` (one
pool process each) and one ``stylequeue dispatch``, all with the DEFAULT timing settings
(``heartbeat_s``, ``lease_s``, ``dispatch_interval_s``, ``dispatch_ahead``, ``publish_grace_s``:
printed at the start) and no rate limit. Tiny jobs (16 and 32 px, ``--iterations`` per scale), random
weights. Every time comes from the ``jobs`` table (``created_at``, ``published_at``, ``started_at``,
``finished_at``), except the kill -> restart time in (kill), polled from it every 50 ms, and the
moment the API's dispatch pass has published in (idle), from its log line (ms).

The script prints the ``workers`` rows it finds (one per worker process, ``node#pid``) and warns when
the dispatcher sees fewer slots than workers.

Phases, one after the other on the same stack:

* fair: tenant A submits ``--a-jobs`` in one batch; once A's jobs hold every worker, tenant B submits
  ``--b-jobs`` in one batch. B's wait before start (median, max) in seconds and in median job
  durations (A's ``finished_at - started_at``); for B's first job, the time from the first slot freed
  after B's submission (the first A job to finish after it) to its start, in job durations (target
  <= 1); A's throughput while B's jobs run and over A's whole run; beside them, what B would wait in
  FIFO order (A's jobs not started at B's submission x the duration / workers). A's remainder is then
  canceled. B's share follows what A has been charged over ``shared.dispatch.FAIR_WINDOW`` when B
  arrives: right after A fills the workers that is only A's running jobs, so B takes the next freed
  slots until its charge catches up, then alternates with A (the order of the tenants of the jobs
  started after B's submission is printed).
* idle: ``--idle-jobs`` single jobs, each submitted once the previous one ended: ``started_at -
  created_at``, median and p90 (target <= 20 ms), split into: until the API's dispatch pass starts
  (``published_at`` is its clock), until it has published, until a worker's claim.
* redis: a batch of 4 jobs per worker; with every worker busy and jobs waiting, the redis-server is
  restarted EMPTY (kill -9, no persistence). From the restart: every job that was queued at it has
  started, and every job has ended (target <= 30 s), beside the time the same work takes without a
  fault (the jobs left x the median duration / workers), and the longest a worker sat idle after the
  restart. ``--redis-down S`` keeps Redis down S seconds before it comes back empty.
* kill: one long job; while it runs, its WHOLE worker is killed -9 (supervisor, Celery main process and
  pool child): the time until the job's next attempt starts on another worker (target <= 30 s).

The last block is ``name value unit target`` lines, ``MISSED`` after a figure that misses its target.
The exit status is 1 only on an error (a phase that could not run to its end), not on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.chaos import (  # noqa: E402
    TERMINAL,
    Chaos,
    broker,
    moto_s3,
    png,
    service_env,
    start_services,
    stop_all,
    submit_batch,
)
from tests.support import chaos_lib  # noqa: E402
from tests.support.servers import temporary_database  # noqa: E402
from tests.support.stacks import stack_settings  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

TIMING = ("heartbeat_s", "lease_s", "dispatch_interval_s", "dispatch_ahead", "publish_grace_s")
PHASES = ("fair", "idle", "redis", "kill")


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: float | None = None  # the value must be <= target

    def line(self) -> str:
        target = "-" if self.target is None else f"<={self.target:g}"
        missed = "  MISSED" if self.target is not None and self.value > self.target else ""
        return f"{self.name:<40} {self.value:>10.3f} {self.unit:<14} {target}{missed}"


@dataclass
class Bench:
    chaos: Chaos
    base: str
    keys: dict[str, str]
    args: argparse.Namespace
    figures: list[Figure] = field(default_factory=list)
    batches: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (tenant, batch, jobs)

    @property
    def settings(self) -> Any:
        return stack_settings(self.chaos.env)

    def params(self, iterations: int | None = None) -> dict[str, Any]:
        its = self.args.iterations if iterations is None else iterations
        return {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": its}

    def submit(self, tenant: str, n: int, params: dict[str, Any], seed: int) -> tuple[str, list[str]]:
        """One batch of ``tenant``'s; remembered, so that a phase's leftovers can be canceled."""
        batch_id, ids = submit_batch(self.base, self.keys[tenant], n, params, seed=seed)
        self.batches.append((tenant, batch_id, ids))
        return batch_id, ids

    def cancel_leftovers(self) -> None:
        """Cancel what a phase left unfinished (it failed half way), so the next starts idle."""
        for tenant, batch_id, ids in self.batches:
            if any(r.status not in TERMINAL for r in self.rows(ids)):
                how = cancel_batch(self, tenant, batch_id, ids)
                print(f"canceled the rest of {tenant}'s batch {batch_id[:8]} ({how})")
                self.wait_terminal(ids, 120, "canceled jobs to end")
        self.batches.clear()

    def add(self, name: str, value: float, unit: str, target: float | None = None) -> None:
        figure = Figure(name, value, unit, target)
        self.figures.append(figure)
        print(figure.line(), flush=True)

    def rows(self, ids: Iterable[str]) -> list[Any]:
        return self.chaos.rows(ids)

    def wait_terminal(self, ids: list[str], timeout: float, what: str) -> list[Any]:
        wait_for(lambda: all(r.status in TERMINAL for r in self.rows(ids)), timeout, what, interval=0.1)
        return self.rows(ids)


def seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def median_duration(rows: Iterable[Any]) -> float:
    done = [seconds(r.started_at, r.finished_at) for r in rows if r.status == "succeeded"]
    if not done:
        raise AssertionError("no job succeeded: no job duration to compare with")
    return statistics.median(done)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def running(rows: Iterable[Any]) -> int:
    return sum(r.status == "running" for r in rows)


def cancel_batch(bench: Bench, tenant: str, batch_id: str, job_ids: list[str]) -> str:
    """``POST /v1/batches/{id}/cancel`` where the API has it, else each job's cancel; which was used."""
    import httpx

    headers = {"Authorization": f"Bearer {bench.keys[tenant]}"}
    with httpx.Client(base_url=bench.base, headers=headers, timeout=60) as http:
        if http.post(f"/v1/batches/{batch_id}/cancel").status_code == 200:
            return "batch cancel"
        left = [r.id for r in bench.rows(job_ids) if r.status not in TERMINAL]
        for job_id in left:
            http.post(f"/v1/jobs/{job_id}/cancel")
    return f"{len(left)} job cancels"


# --- fair ----------------------------------------------------------------------------------------


def phase_fair(bench: Bench) -> None:
    args, workers = bench.args, len(bench.chaos.workers)
    a_batch, a_ids = bench.submit("A", args.a_jobs, bench.params(), seed=0)
    try:
        wait_for(lambda: running(bench.rows(a_ids)) >= workers, 60, "A's jobs on every worker", 0.05)
    except AssertionError:
        print(f"note: A's jobs never held all {workers} workers (at most: see a_running_at_b_submit)")
    _, b_ids = bench.submit("B", args.b_jobs, bench.params(), seed=100_000)
    bench.wait_terminal(b_ids, 60 + 30 * args.b_jobs, "B's jobs to end")
    how = cancel_batch(bench, "A", a_batch, a_ids)
    a_rows = bench.wait_terminal(a_ids, 120, "A's jobs to end after the cancel")
    print(f"A's remainder canceled ({how})", flush=True)
    fair_figures(bench, a_rows, bench.rows(b_ids))


def fair_figures(bench: Bench, a_rows: list[Any], b_rows: list[Any]) -> None:
    dur = median_duration(a_rows)
    b_created = min(r.created_at for r in b_rows)
    if any(r.started_at is None for r in b_rows):
        raise AssertionError(f"B's jobs ended unstarted: {[r.status for r in b_rows]}")
    waits = [seconds(r.created_at, r.started_at) for r in b_rows]
    holding = sum(
        r.started_at is not None and r.started_at <= b_created < (r.finished_at or utcnow()) for r in a_rows
    )
    ahead = sum(r.started_at is None or r.started_at > b_created for r in a_rows)
    freed = sorted(r.finished_at for r in a_rows if r.finished_at is not None and r.finished_at > b_created)
    b_first = min(r.started_at for r in b_rows)
    workers = len(bench.chaos.workers)
    bench.add("fair.job_duration_median", dur, "s")
    bench.add("fair.a_running_at_b_submit", holding, "jobs")
    bench.add("fair.b_wait_median", statistics.median(waits), "s")
    bench.add("fair.b_wait_max", max(waits), "s")
    bench.add("fair.b_wait_median_in_jobs", statistics.median(waits) / dur, "job_durations")
    bench.add("fair.b_wait_max_in_jobs", max(waits) / dur, "job_durations")
    bench.add("fair.b_wait_fifo_estimate", ahead * dur / workers, "s")  # A's queued jobs, in order
    if freed and freed[0] <= b_first:
        bench.add("fair.b_first_after_slot_free", seconds(freed[0], b_first) / dur, "job_durations", 1)
        bench.add("fair.b_first_after_slot_free_s", seconds(freed[0], b_first), "s")
    else:
        print("note: B's first job started before any A job finished (a slot was free)")
        bench.add("fair.b_first_after_submit", seconds(b_created, b_first) / dur, "job_durations", 1)
    throughput(bench, a_rows, b_created, max(r.finished_at for r in b_rows))
    after = sorted(
        (r.started_at, r.tenant_id == b_rows[0].tenant_id) for r in [*a_rows, *b_rows] if r.started_at
    )
    order = "".join("B" if is_b else "A" for t, is_b in after if t > b_created)[: 3 * len(b_rows)]
    print(f"tenants of the jobs started after B's submission, in order: {order}")


def throughput(bench: Bench, a_rows: list[Any], start: datetime, end: datetime) -> None:
    """A's jobs finished per minute: while B's jobs ran (``start``..``end``), and over A's run."""
    done = [r for r in a_rows if r.status == "succeeded"]
    during = sum(start <= r.finished_at <= end for r in done)
    bench.add("fair.a_throughput_during_b", 60 * during / max(1e-9, seconds(start, end)), "jobs/min")
    first, last = min(r.started_at for r in done), max(r.finished_at for r in done)
    bench.add("fair.a_throughput_overall", 60 * len(done) / max(1e-9, seconds(first, last)), "jobs/min")


# --- idle ----------------------------------------------------------------------------------------


def phase_idle(bench: Bench) -> None:
    from api.client import StyleQueueClient

    rows: list[Any] = []
    with StyleQueueClient(bench.base, bench.keys["A"], timeout=60) as c:
        content = str(c.upload_image(png(200_000), "content.png")["id"])
        style = str(c.upload_image(png(200_001, 48), "style.png")["id"])
        for _ in range(bench.args.idle_jobs):
            job_id = str(c.submit_job(content, [style], params=bench.params())["id"])
            (row,) = bench.wait_terminal([job_id], 60, "an idle-system job to end")
            if row.started_at is None:
                raise AssertionError(f"idle job {job_id} ended {row.status} without starting")
            rows.append(row)
    delays = [seconds(r.created_at, r.started_at) for r in rows]
    bench.add("idle.start_latency_median", 1000 * statistics.median(delays), "ms", 20)
    bench.add("idle.start_latency_p90", 1000 * percentile(delays, 0.9), "ms", 20)
    bench.add("idle.start_latency_max", 1000 * max(delays), "ms")
    # Where the time goes: the API's dispatch pass starts (``published_at`` is its clock), it has
    # published (its ``dispatched`` log line, ms), a worker's claim sets ``started_at``.
    sent = dispatched_at(bench.chaos.log("api"))
    split = [(r.created_at, r.published_at, sent[r.id], r.started_at) for r in rows if r.id in sent]
    split = [t for t in split if t[1] is not None]
    names = ("created_to_pass_start", "pass_start_to_published", "published_to_started")
    for i, name in enumerate(names):
        if split:
            bench.add(
                f"idle.{name}_median", 1000 * statistics.median(seconds(t[i], t[i + 1]) for t in split), "ms"
            )


def dispatched_at(log: Path) -> dict[str, datetime]:
    """When a dispatch pass logged ``dispatched`` (after publishing), by the first job it published."""
    found: dict[str, datetime] = {}
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in lines:
        event = chaos_lib.parse_event(line)
        if event is not None and event.event == "dispatched":
            local = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # logging's asctime: local
            found.setdefault(event.job_id, local.astimezone(timezone.utc))
    return found


# --- redis ---------------------------------------------------------------------------------------


def phase_redis(bench: Bench) -> None:
    workers = len(bench.chaos.workers)
    n = (3 if bench.args.quick else 4) * workers
    _, ids = bench.submit("A", n, bench.params(), seed=300_000)

    def busy() -> list[Any] | None:
        rows = bench.rows(ids)
        return rows if running(rows) >= workers and any(r.status == "queued" for r in rows) else None

    before = wait_for(busy, 60, "every worker busy with jobs waiting", interval=0.02)
    republished = log_count(bench.chaos.log("dispatch"), "event=message_lost")
    restart = utcnow()
    bench.chaos.restart_redis(bench.args.redis_down)
    queued = {r.id for r in before if r.status == "queued"}
    out = sum(r.status == "queued" and r.published_at is not None for r in before)
    print(
        f"redis restarted empty (down {bench.args.redis_down:g}s): {running(before)} running, "
        f"{len(queued)} queued ({out} of them published)"
    )
    timeout = bench.settings.publish_grace_s + 60 + 10 * n
    rows = bench.wait_terminal(ids, timeout, "every job to end after the Redis restart")
    if any(r.status != "succeeded" for r in rows):
        print(f"note: not all succeeded after the restart: {sorted(r.status for r in rows)}")
    started = [r.started_at for r in rows if r.id in queued and r.started_at is not None]
    if len(started) < len(queued):
        raise AssertionError(f"{len(queued) - len(started)} job(s) queued at the restart never started")
    bench.add("redis.queued_at_restart", len(queued), "jobs")
    bench.add("redis.published_unstarted_at_restart", out, "jobs")
    bench.add("redis.restart_to_all_queued_started", seconds(restart, max(started)), "s", 30)
    bench.add("redis.restart_to_all_ended", seconds(restart, max(r.finished_at for r in rows)), "s", 30)
    # Without a fault: the jobs left at the restart take about (queued + running) x duration / workers
    left = len(queued) + running(before)
    bench.add("redis.no_fault_all_ended_estimate", left * median_duration(rows) / workers, "s")
    bench.add("redis.max_slot_idle_after_restart", slot_idle(rows, restart), "s")
    republished = log_count(bench.chaos.log("dispatch"), "event=message_lost") - republished
    bench.add("redis.republished_after_restart", republished, "messages")


def slot_idle(rows: list[Any], since: datetime) -> float:
    """The longest a worker sat idle between two of these jobs, after ``since`` (node from
    ``jobs.worker``, ``node#pid``): the stall a fault caused while jobs were waiting."""
    by_node: dict[str, list[Any]] = {}
    for r in rows:
        if r.worker and r.started_at and r.finished_at:
            by_node.setdefault(r.worker.rsplit("#", 1)[0], []).append(r)
    gaps = [0.0]
    for jobs in by_node.values():
        jobs.sort(key=lambda r: r.started_at)
        for prev, nxt in itertools.pairwise(jobs):
            if nxt.started_at > since:
                gaps.append(seconds(max(prev.finished_at, since), nxt.started_at))
    return max(gaps)


def log_count(log: Path, needle: str) -> int:
    return sum(needle in line for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0


# --- kill ----------------------------------------------------------------------------------------


def phase_kill(bench: Bench) -> None:
    chaos = bench.chaos
    if len(chaos.workers) < 2:
        raise AssertionError("the kill phase needs 2 workers (the job restarts on the other one)")
    its = 150 if bench.args.quick else 300
    _, ids = bench.submit("A", 1, bench.params(its), seed=400_000)
    row = wait_for(lambda: next((r for r in bench.rows(ids) if r.status == "running"), None), 60, "the job")
    time.sleep(1.0)  # running for a while: a checkpoint and progress written
    victim = chaos.owner(chaos_lib.holder_pid(row.worker))
    if victim is None:
        raise AssertionError(f"no worker of this bench runs the job (held by {row.worker})")
    t_kill = time.monotonic()
    chaos_lib.kill_whole_worker(chaos.procs.pop(victim))
    print(f"killed worker {victim} (whole) running job {row.id[:8]} attempt {row.attempt}", flush=True)

    def next_attempt() -> Any:
        (now,) = bench.rows(ids)
        return now if now.attempt > row.attempt or now.status in TERMINAL else None

    again = wait_for(next_attempt, 120, "the job's next attempt", interval=0.05)
    elapsed = time.monotonic() - t_kill
    holder = chaos.owner(chaos_lib.holder_pid(again.worker))
    print(f"next: attempt {again.attempt} {again.status} on {holder or again.worker}", flush=True)
    if again.status != "running" and again.attempt == row.attempt:
        raise AssertionError(f"the job ended {again.status} without another attempt")
    bench.add("kill.to_next_start", elapsed, "s", 30)
    bench.wait_terminal(ids, 120, "the killed worker's job to end")


# --- the run -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-jobs", type=int, default=200, help="tenant A's batch")
    ap.add_argument("--b-jobs", type=int, default=5, help="tenant B's batch, once A holds the workers")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20, help="iterations per scale (2 scales)")
    ap.add_argument("--idle-jobs", type=int, default=20)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)}")
    ap.add_argument("--quick", action="store_true", help="small sizes: just check that it runs")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the logs folder")
    ap.add_argument("--redis-down", type=float, default=0.0, help="seconds Redis stays down (redis phase)")
    args = ap.parse_args()
    if args.quick:
        args.a_jobs, args.b_jobs = min(args.a_jobs, 30), min(args.b_jobs, 3)
        args.idle_jobs, args.iterations = min(args.idle_jobs, 8), min(args.iterations, 10)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    return args


def run_phases(bench: Bench) -> list[str]:
    """Each phase asked for, in order; the errors (a phase that could not finish)."""
    steps: dict[str, Callable[[Bench], None]] = dict(
        fair=phase_fair, idle=phase_idle, redis=phase_redis, kill=phase_kill
    )
    errors: list[str] = []
    for name in PHASES:
        if name not in bench.args.phases.split(","):
            continue
        print(f"--- {name}", flush=True)
        t0 = time.monotonic()
        try:
            steps[name](bench)
        except (AssertionError, OSError, RuntimeError) as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"ERROR in {name}: {exc}", flush=True)
        bench.cancel_leftovers()
        print(f"({name}: {time.monotonic() - t0:.0f}s)", flush=True)
    return errors


def main() -> int:
    args = parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    tmp = Path(tempfile.mkdtemp(prefix="sq-fair-"))
    t0 = time.monotonic()
    with (
        temporary_database("sq_fair") as db_url,
        broker(tmp) as (broker_url, redis),
        moto_s3() as (s3_url, _, bucket),
    ):
        if redis is None and "redis" in args.phases:
            raise SystemExit("the redis phase needs redis-server on PATH (the shared Redis is not restarted)")
        env = service_env(tmp, db_url, broker_url, s3_url, bucket)
        workers = tuple(f"w{i}" for i in range(args.workers))
        chaos = Chaos(
            env,
            tmp,
            db_url,
            random.Random(seed),
            workers=workers,
            redis=redis,
            dispatch_args=("dispatch",),
        )
        try:
            base, keys = start_services(chaos, ["A", "B"])
            bench = Bench(chaos, base, keys, args)
            timing = " ".join(f"{k}={getattr(bench.settings, k)}" for k in TIMING)
            print(f"stack up after {time.monotonic() - t0:.0f}s: {args.workers} workers, defaults {timing}")
            registered(bench)
            errors = run_phases(bench)
        finally:
            stop_all(chaos)
    report(bench, errors, tmp, t0)
    return 1 if errors else 0


def registered(bench: Bench) -> None:
    """What the dispatcher fills: the ``workers`` rows and their healthy slots, once all are up."""
    from shared import workers
    from shared.db import get_sessionmaker

    n = len(bench.chaos.workers)

    def summary() -> Any:
        with get_sessionmaker(bench.chaos.database_url)() as s:
            found = workers.summary(s, now=utcnow(), lease_s=bench.settings.lease_s)
        return found if found.slots >= n else None

    try:
        found = wait_for(summary, 20, f"{n} healthy worker slots", interval=0.2)
    except AssertionError:
        with get_sessionmaker(bench.chaos.database_url)() as s:
            found = workers.summary(s, now=utcnow(), lease_s=bench.settings.lease_s)
    ids = [w.id for w in found.workers]
    print(f"workers table: {len(ids)} row(s) {ids}, {found.slots} healthy slot(s) for {n} worker processes")
    if found.slots < n:
        print(
            f"WARNING: the dispatcher sees {found.slots} slot(s) for {n} workers: at most that many jobs run "
            "at once"
        )


def report(bench: Bench, errors: list[str], tmp: Path, t0: float) -> None:
    if bench.args.keep:
        print(f"logs: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wall={time.monotonic() - t0:.0f}s")
    print(f"\n{'name':<40} {'value':>10} {'unit':<14} target")
    for figure in bench.figures:
        print(figure.line())
    for error in errors:
        print(f"ERROR {error}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
