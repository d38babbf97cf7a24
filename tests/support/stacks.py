"""Real processes for the integration and fault tests: ``stylequeue worker`` and ``stylequeue api``
subprocesses (a :class:`Stack`), their environment (``stack_env``) and an API key (``make_key``).

Workers run with ``STYLEQUEUE_WEIGHTS=random`` on the CPU, tiny images and few iterations.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import update

from api.client import StyleQueueClient
from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from shared.storage import Storage, open_storage
from tests.support import REPO
from tests.support.servers import free_port, stop_process
from tests.support.waiting import wait_for

STYLEQUEUE = [sys.executable, "-m", "shared.cli"]

# Tiny, fast jobs: 2 scales (24 and 48 px).
TINY = {"size": 48, "min_size": 24, "scale_factor": 2, "iterations": 2}
# A job long enough to act on while it runs (2 x 300 iterations; ~0.03 s each at 48 px).
LONG = {"size": 48, "min_size": 24, "scale_factor": 2, "iterations": 300}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [*STYLEQUEUE, *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


stop = stop_process  # SIGTERM, wait, then SIGKILL the process group


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    settings: Settings
    tmp: Path
    api_url: str = ""
    key: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def worker_log(self) -> Path:
        return self.log_of("worker")

    def log_of(self, name: str) -> Path:
        """The log file of the process started under ``name`` (``worker`` by default)."""
        return self.tmp / f"{name}.log"

    def start_worker(
        self, *extra: str, name: str = "worker", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``stylequeue worker`` as ``procs[name]`` (several may run, each with its own log)."""
        log = self.log_of(name)
        proc = start(["worker", "--cpu", "--loglevel", "info", *extra], env or self.env, log)
        self.procs[name] = proc
        wait_for(
            lambda: proc.poll() is not None or " ready." in log.read_text(),
            60,
            f"the worker {name!r} to be ready",
        )
        assert proc.poll() is None, self.log_tail(name=name)
        return proc

    def forget_ready(self, name: str = "worker") -> None:
        """Mark the log so the next start of ``name`` waits for a new "ready."."""
        log = self.log_of(name)
        if log.exists():
            log.write_text(log.read_text().replace(" ready.", " was ready."))

    def stop_worker(self, name: str = "worker") -> int:
        code = stop(self.procs.pop(name))
        self.forget_ready(name)
        return code

    def start_api(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.procs["api"] = start(["api", "--port", str(port)], self.env, self.tmp / "api.log")

        def up() -> bool:
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API", interval=0.2)

    def client(self) -> StyleQueueClient:
        return StyleQueueClient(self.api_url, self.key, timeout=30)

    def storage(self) -> Storage:
        return open_storage(self.settings)

    def job(self, job_id: str) -> Job:
        with get_sessionmaker(self.settings.database_url)() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def update_job(self, job_id: str, **values: Any) -> None:
        with get_sessionmaker(self.settings.database_url)() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**values))
            s.commit()

    def log_tail(self, n: int = 40, name: str = "worker") -> str:
        log = self.log_of(name)
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return "\n".join(lines[-n:])

    def close(self) -> None:
        """SIGTERM every process at once (each shuts down in parallel), then wait for each."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()


# The fault tests' timings: a worker or job silent for 4 s is presumed dead, a pass every 0.5 s.
FAST_TIMING: dict[str, Any] = dict(
    heartbeat_s=0.3,
    lease_s=4,
    publish_grace_s=4,
    dispatch_interval_s=0.5,
    progress_interval_s=0.2,
    checkpoint_every=10,
    max_attempts=3,
)


def stack_env(tmp: Path, **values: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    base: dict[str, Any] = dict(
        data_dir=tmp / "data",
        weights="random",
        device="cpu",
        auth="on",
        progress_interval_s=0.2,
        heartbeat_s=0.5,
        lease_s=20,
        checkpoint_every=100,
        queue_name=f"sq-test-{uuid.uuid4().hex[:8]}",
        rate_limit="",  # the tests poll fast with one key; the limits have their own tests
    )
    base.update(values)
    env.update({f"STYLEQUEUE_{k.upper()}": str(v) for k, v in base.items()})
    env["OMP_NUM_THREADS"] = "1"  # two pool processes on two cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stack_settings(env: dict[str, str]) -> Settings:
    values = {k[len("STYLEQUEUE_") :].lower(): v for k, v in env.items() if k.startswith("STYLEQUEUE_")}
    return Settings.model_validate(values)


def make_key(settings: Settings) -> str:
    from shared.tenants import create_key

    with get_sessionmaker(settings.database_url)() as s:
        key = create_key(s, f"tenant-{uuid.uuid4().hex[:6]}").key
        s.commit()
    return key
