"""Submission throughput of the API, measured over real HTTP (not a test).

Prints, for the PostgreSQL + Redis setup and for the embedded default (SQLite + kombu's SQL
transport + a local folder):

* single-job submissions per second (sequential ``POST /v1/jobs`` naming uploaded image ids);
* bulk submission: jobs per second inside one ``POST /v1/batches`` of 1,000 jobs.

The API runs as ``uvicorn --factory api.app:create_app`` in a subprocess on a free port.

    .venv/bin/python bench/service.py [--singles 200] [--skip-pg]

The delay from submission to the worker starting a job and the worker's overhead over the engine
alone are measured by ``bench/service_worker.py`` (``make bench`` runs both).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support.servers import temporary_database  # noqa: E402

REDIS = os.environ.get("STYLEQUEUE_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (i % 256, (i * 7) % 256, (i // 256) % 256)).save(buf, "PNG")
    return buf.getvalue()


def postgres_db() -> contextlib.AbstractContextManager[str]:
    return temporary_database("sq_bench")


@contextmanager
def api_server(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Migrate, create a key, start uvicorn; yield (base URL, API key)."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "migrate"], env=full_env, check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", "--tenant", "bench"],
        env=full_env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:create_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=full_env,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(10)


def measure(url: str, key: str, singles: int) -> dict[str, float]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        ids = [http.post("/v1/images", files={"file": ("i.png", png(i))}).json()["id"] for i in range(65)]
        form = {"content_id": ids[0], "style_id": ids[1]}
        for _ in range(5):  # warm up
            http.post("/v1/jobs", data=form).raise_for_status()
        start = time.perf_counter()
        for _ in range(singles):
            http.post("/v1/jobs", data=form).raise_for_status()
        single_s = time.perf_counter() - start
        body = {"contents": ids[:40], "styles": ids[40:65]}
        start = time.perf_counter()
        r = http.post("/v1/batches", json=body)
        batch_s = time.perf_counter() - start
        r.raise_for_status()
        assert r.json()["job_count"] == 1000
    return {"single_per_s": singles / single_s, "batch_s": batch_s, "batch_per_s": 1000 / batch_s}


def report(name: str, m: dict[str, float]) -> None:
    print(
        f"{name:<28} single: {m['single_per_s']:7.1f} jobs/s   "
        f"batch of 1000: {m['batch_s']:.3f} s = {m['batch_per_s']:8.0f} jobs/s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--skip-pg", action="store_true", help="only the embedded default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_pg:
            queue = f"stylequeue-bench-{uuid.uuid4().hex[:8]}"
            with postgres_db() as pg:
                env = {
                    "STYLEQUEUE_DATA_DIR": f"{tmp}/pg",
                    "STYLEQUEUE_DATABASE_URL": pg,
                    "STYLEQUEUE_BROKER_URL": REDIS,
                    "STYLEQUEUE_QUEUE_NAME": queue,
                }
                with api_server(env) as (url, key):
                    report("PostgreSQL + Redis", measure(url, key, args.singles))
            import redis

            redis.Redis.from_url(REDIS).delete(queue)  # only our own queue key
        env = {"STYLEQUEUE_DATA_DIR": f"{tmp}/embedded"}
        with api_server(env) as (url, key):
            report("embedded (SQLite + SQL MQ)", measure(url, key, args.singles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
