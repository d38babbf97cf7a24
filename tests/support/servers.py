"""The real servers the tests use, with no pytest fixture here (bench scripts import it too).

Loopback and process helpers (``port_open``, ``free_port``, ``stop_process``), throwaway PostgreSQL
databases on the shared server (``temporary_database``), where Redis and S3 are, and ``require``:
skip when a server is missing on a developer machine, fail under ``CI=true``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_DSN = os.environ.get("STYLEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def require(ok: bool, reason: str) -> None:
    """Skip when a server is missing on a developer machine; fail on CI, where it must be there."""
    import pytest

    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: servers must be available)")
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, wait, then SIGKILL the process group if it is still there (a blocked event loop
    never handles SIGTERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode)


@contextmanager
def temporary_database(prefix: str = "sq_test") -> Iterator[str]:
    """Create a fresh database, yield its SQLAlchemy URL, then drop it (closing its connections)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        from shared.db import get_engine

        get_engine(url).dispose()  # our pooled connections; WITH (FORCE) ends anyone else's
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    bucket: str

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/stylequeue"
