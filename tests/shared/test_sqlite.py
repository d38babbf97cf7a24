"""The embedded database (shared.db, SQLite): a new connection switches the file to WAL even while
another process writes to it (SQLite refuses that switch at once rather than wait)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from shared import db


def test_a_new_connection_waits_out_a_writer_to_switch_to_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fresh.db"
    sqlite3.connect(path).execute("create table t(a)")  # a rollback journal: not WAL yet
    held, release = threading.Event(), threading.Event()

    def writer() -> None:  # another process, as far as SQLite's locks go
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("begin immediate")
        conn.execute("insert into t values (1)")
        held.set()
        release.wait(30)
        conn.execute("commit")
        conn.close()

    refused: list[float] = []

    def sleep(seconds: float) -> None:  # refused once: the writer may finish now
        refused.append(seconds)
        release.set()
        time.sleep(seconds)

    monkeypatch.setattr(db, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert held.wait(30)
    try:
        with db.get_engine(f"sqlite:///{path}").connect() as conn:
            mode = conn.execute(text("PRAGMA journal_mode")).scalar()
    finally:
        release.set()
        thread.join(30)
    assert mode == "wal" and refused  # refused while the writer held it, then switched
