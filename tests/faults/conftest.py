"""A PRIVATE PostgreSQL cluster that fault tests may stop and start (never the shared one).

``initdb`` and ``pg_ctl`` come from /usr/lib/postgresql/*/bin. PostgreSQL refuses to run as root, so
as root the cluster runs as the ``postgres`` OS user (``runuser``). Data, log and socket live in a
temporary folder; trust auth; a free loopback port; fsync off (a stopped server still leaves its WAL
in the OS cache, so a commit it acknowledged survives an immediate stop).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.net import free_port


def _pg_bin() -> Path | None:
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


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgCluster]:
    """A running private cluster; its url names the ``postgres`` database."""
    bindir = _pg_bin()
    require(bindir is not None, "initdb/pg_ctl not found (install the PostgreSQL server package)")
    assert bindir is not None
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="sq-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = None
        require(
            runuser is not None and user is not None,
            "running as root needs runuser and a 'postgres' OS user for initdb",
        )
        assert user is not None and runuser is not None
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = [runuser, "-u", "postgres", "--"]
    cluster = PgCluster(bindir, root, free_port(), run_as)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.data.exists() and cluster.running():
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
