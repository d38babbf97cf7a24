"""A PRIVATE PostgreSQL cluster that fault tests may stop and start (never the shared one).

``initdb`` and ``pg_ctl`` come from /usr/lib/postgresql/*/bin. PostgreSQL refuses to run as root, so
as root the cluster runs as the ``postgres`` OS user (``runuser``). Data, log and socket live in a
temporary folder; trust auth; a free loopback port; fsync off (a stopped server still leaves its WAL
in the OS cache, so a commit it acknowledged survives an immediate stop).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chaos_lib import PgCluster, pg_bin
from tests.support.servers import free_port, require


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgCluster]:
    """A running private cluster; its url names the ``postgres`` database."""
    bindir = pg_bin()
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
