"""Helpers for the worker fault tests (tests/faults/test_worker_faults.py) and ``bench/chaos.py``.

* killing workers: the WHOLE worker (``kill -9`` of the Celery main process's process group: main
  process and pool children) or ONLY a pool child;
* ``PrivateRedis``: a redis-server on a free loopback port that a test may kill and restart empty;
* ``TcpProxy``: a loopback TCP proxy (in front of moto's S3 server) that can be cut and restored on
  the same port, so storage becomes unreachable for a while;
* ``job_events``: the workers' ``job_event job_id=... attempt=... event=... k=v`` log lines, parsed;
* S3 object versions (the bucket has versioning on): how many times a key was written;
* ``PgCluster``: a private PostgreSQL cluster (``initdb``/``pg_ctl``) that a test may stop and start.

Processes: ``stylequeue worker`` is a supervisor that starts one ``celery worker`` per device, each in
its own session (process group); the Celery main process forks the pool children into that group.
Killing the supervisor alone is NOT a crash: its children get SIGTERM (parent-death signal) and shut
down warm. So a whole-worker crash kills the Celery group first, then the supervisor.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- processes ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty when it is gone)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    if found or not Path(f"/proc/{pid}").exists():
        return found
    for stat in Path("/proc").glob("[0-9]*/stat"):  # kernels without task/*/children
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    return False


def celery_mains(supervisor_pid: int) -> list[int]:
    """The Celery main process(es) a ``stylequeue worker`` supervisor started."""
    return children(supervisor_pid)


def pool_children(supervisor_pid: int) -> list[int]:
    return [p for main in celery_mains(supervisor_pid) for p in children(main)]


def kill_whole_worker(proc: subprocess.Popen[bytes]) -> list[int]:
    """``kill -9`` the whole worker: each Celery main's process group (main and pool children),
    then the supervisor. Returns the pids killed."""
    killed: list[int] = []
    for main in celery_mains(proc.pid):
        killed += [main, *children(main)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main, signal.SIGKILL)  # its own session: pgid == pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    killed.append(proc.pid)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def kill_pid(pid: int) -> None:
    """``kill -9`` one process (a pool child); waits until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def holder_pid(worker_field: str | None) -> int | None:
    """The pool process named by ``jobs.worker`` (``node@host#pid``)."""
    if not worker_field or "#" not in worker_field:
        return None
    tail = worker_field.rsplit("#", 1)[1]
    return int(tail) if tail.isdigit() else None


# --- a private Redis ---------------------------------------------------------------------------


class PrivateRedis:
    """``redis-server`` with no persistence on a free loopback port: killed, it restarts EMPTY."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """``kill -9``: everything it held is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart_empty(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def dbsize(self, db: int = 0) -> int:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, db=db)
        try:
            return int(client.dbsize())
        finally:
            client.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --- a TCP proxy that can be cut ---------------------------------------------------------------


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target``. ``cut()`` closes the listening socket and every live
    connection (clients get connection refused / reset); ``restore()`` listens on the SAME port again.
    The target (moto, with its in-memory buckets) is never touched."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True, name="proxy-accept").start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut or closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._conns.discard(s)
                s.close()

    def cut(self) -> None:
        self.cuts += 1
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def close(self) -> None:
        self.cut()


# --- worker logs -------------------------------------------------------------------------------

EVENT_RE = re.compile(r"job_event (.*)$")


@dataclass
class Event:
    job_id: str
    attempt: int | None
    event: str
    fields: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def int(self, name: str) -> int | None:
        value = self.fields.get(name)
        return int(value) if value is not None and value.lstrip("-").isdigit() else None


def parse_event(line: str, source: str = "") -> Event | None:
    """A ``job_event k=v ...`` line (one shape everywhere: job_id, attempt, event first; shared.logs)."""
    m = EVENT_RE.search(line)
    if not m:
        return None
    fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
    if "job_id" not in fields or "event" not in fields:
        return None
    attempt_text = fields.pop("attempt", "")
    attempt = int(attempt_text) if attempt_text.isdigit() else None
    return Event(fields.pop("job_id"), attempt, fields.pop("event"), fields, source)


def job_events(logs: Iterable[Path], job_id: str | None = None) -> list[Event]:
    """Every ``job_event`` line of the given log files (in file order, file by file)."""
    events: list[Event] = []
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            e = parse_event(line, log.name)
            if e is not None and (job_id is None or e.job_id == job_id):
                events.append(e)
    return events


def count(events: list[Event], event: str, job_id: str | None = None, attempt: int | None = None) -> int:
    return sum(
        e.event == event
        and (job_id is None or e.job_id == job_id)
        and (attempt is None or e.attempt == attempt)
        for e in events
    )


# --- S3 ----------------------------------------------------------------------------------------


def s3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


def enable_versioning(client: Any, bucket: str) -> None:
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def versions(client: Any, bucket: str, key: str) -> int:
    """How many versions of exactly ``key`` the (versioned) bucket holds."""
    n = 0
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        n += sum(v["Key"] == key for v in page.get("Versions", []))
    return n


# --- a private PostgreSQL cluster (test_db_outage.py stops and starts it) ----------------------


def pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found and Path(found[-1]).with_name("initdb").exists():
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int
    run_as: list[str]  # ["runuser", "-u", "postgres", "--"] as root, [] otherwise

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, timeout: float = 30) -> None:
        cmd = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)

    def init(self) -> None:
        cmd = [
            *self.run_as,
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=60"
        )
        self._ctl("-l", str(self.root / "postgres.log"), "-w", "-t", "30", "-o", opts, "start")

    def stop(self, mode: str = "immediate") -> None:
        self._ctl("-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        cmd = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
