"""Worker figures, measured with real processes (not a test):

* delay from submission to worker start: ``started_at - created_at`` of jobs submitted one at a time
  to an idle worker (median, p99), on PostgreSQL + Redis and on the embedded default;
* worker overhead: a job's wall time in the worker (``finished_at - started_at``: claim, downloads,
  engine, checkpoints, progress writes, upload) divided by the engine alone on the same input and
  config in this process (target <= 1.05).

    .venv/bin/python bench/service_worker.py [--jobs 30] [--size 128] [--iterations 40] [--skip-pg]

Uses ``stylequeue worker --cpu`` with STYLEQUEUE_WEIGHTS=random (the cost of a step does not depend
on the weights' values), the API from bench/service.py, and local folder storage.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service import api_server, png, postgres_db  # noqa: E402

REDIS = os.environ.get("STYLEQUEUE_BENCH_REDIS", "redis://127.0.0.1:6379/15")
TINY = {"size": 32, "min_size": 32, "iterations": 1}


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, **env, "STYLEQUEUE_WEIGHTS": "random", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "worker", "--cpu"],
        env=full,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    time.sleep(8)  # let the pool process finish loading the model (preload)
    return proc


def job_times(database_url: str, job_id: str) -> tuple[float, float]:
    """(start delay, wall time in the worker) of a finished job, from the jobs table."""
    from shared.db import get_sessionmaker
    from shared.models import Job
    from worker.jobstore import as_utc

    with get_sessionmaker(database_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", (job_id, job and job.status)
        created, started, finished = (as_utc(job.created_at), as_utc(job.started_at), as_utc(job.finished_at))
        assert created and started and finished
        return (started - created).total_seconds(), (finished - started).total_seconds()


def run_one(http: httpx.Client, ids: list[str], params: dict[str, Any], poll_s: float = 0.05) -> str:
    """Submit one job and wait for it (times come from the job row, not from this polling; poll
    slowly for long jobs so the API's work does not slow the worker down)."""
    import json

    r = http.post("/v1/jobs", data={"content_id": ids[0], "style_id": ids[1], "params": json.dumps(params)})
    r.raise_for_status()
    job_id = str(r.json()["id"])
    while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(poll_s)
    return job_id


class Alone:
    """The engine alone, in this process, on the same inputs and config the worker gets."""

    def __init__(self, content: bytes, style: bytes, params: dict[str, Any]) -> None:
        from shared.params import JobParams
        from shared.settings import Settings
        from worker.config import transfer_config
        from worker.engine import StyleTransfer, load_image

        self.config = transfer_config(JobParams(**params), Settings(weights="random", device="cpu"))
        self.engine = StyleTransfer(weights="random", device="cpu")
        self.images = load_image(content), load_image(style)
        self.time()  # warm-up: model load

    def time(self) -> float:
        t0 = time.perf_counter()
        self.engine.run(self.images[0], [self.images[1]], self.config)
        return time.perf_counter() - t0


def measure(name: str, env: dict[str, str], tmp: Path, args: argparse.Namespace) -> None:
    database_url = env.get("STYLEQUEUE_DATABASE_URL") or f"sqlite:///{tmp}/stylequeue.db"
    with api_server(env) as (url, key):
        worker = start_worker(env, tmp / "worker.log")
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
                ids = [
                    http.post("/v1/images", files={"file": (f"{i}.png", png(i))}).json()["id"] for i in (1, 2)
                ]
                run_one(http, ids, TINY)  # warm-up
                delays = [job_times(database_url, run_one(http, ids, TINY))[0] for _ in range(args.jobs)]
                big = {
                    "size": args.size,
                    "min_size": args.size // 2,
                    "scale_factor": 2,
                    "iterations": args.iterations,
                }
                # Alternate worker job / engine alone, so load from elsewhere hits both alike.
                engine = Alone(png(1), png(2), big)
                walls, alones = [], []
                for _ in range(args.repeats):
                    walls.append(job_times(database_url, run_one(http, ids, big, poll_s=1.0))[1])
                    alones.append(engine.time())
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    delays.sort()
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    ratio = statistics.median(w / a for w, a in zip(walls, alones, strict=True))
    print(
        f"{name:<28} start delay: median {1000 * statistics.median(delays):6.1f} ms, "
        f"p99 {1000 * p99:6.1f} ms ({len(delays)} jobs)   overhead: worker "
        f"{statistics.median(walls):.2f} s / engine alone {statistics.median(alones):.2f} s, "
        f"median ratio {ratio:.3f} ({args.size} px, {args.iterations} it/scale, "
        f"{args.repeats} pairs)",
        flush=True,
    )


def worker_metrics(env: dict[str, str]) -> dict[str, float] | None:
    """Hook for bench/service.py: not used (run this script instead)."""
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=30, help="tiny jobs for the start delay")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-pg", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_pg:
            queue = f"sq-bench-{uuid.uuid4().hex[:8]}"
            with postgres_db() as pg:
                env = {
                    "STYLEQUEUE_DATA_DIR": f"{tmp}/pg",
                    "STYLEQUEUE_DATABASE_URL": pg,
                    "STYLEQUEUE_BROKER_URL": REDIS,
                    "STYLEQUEUE_QUEUE_NAME": queue,
                }
                Path(f"{tmp}/pg").mkdir()
                measure("PostgreSQL + Redis", env, Path(f"{tmp}/pg"), args)
        Path(f"{tmp}/embedded").mkdir()
        env = {"STYLEQUEUE_DATA_DIR": f"{tmp}/embedded"}
        measure("embedded (SQLite + SQL MQ)", env, Path(f"{tmp}/embedded"), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
