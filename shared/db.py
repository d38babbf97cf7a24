"""SQLAlchemy engine and session factory, one per process and database URL; the outage classifier."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

# Fail fast when the database is down or unreachable: callers answer 503 instead of hanging.
CONNECT_TIMEOUT_S = 3  # per connection attempt (libpq connect_timeout)
POOL_TIMEOUT_S = 5  # waiting for a free pooled connection
WAL_WAIT_S = 30.0  # SQLite: how long a new connection tries to switch the file to WAL
WAL_RETRY_S = 0.05
_PG_CONNECT_ARGS = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    # A server that vanished without closing the socket is noticed in seconds, not minutes.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms that sent data may stay unacknowledged
}


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")  # first: wait for locks rather than fail
            _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    connect_args = _PG_CONNECT_ARGS if url.startswith("postgresql") else {}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=connect_args,
    )


def _wal(cur: Any) -> None:
    """WAL, so that the API reads while a worker writes; kept in the file, so set once. Switching
    needs the database alone, and SQLite answers "database is locked" at once, without waiting,
    while another process writes to it (its busy handler would deadlock): tried again for at
    most ``WAL_WAIT_S`` (seen at a stack's start: the API's first connection beside the worker's)."""
    deadline = time.monotonic() + WAL_WAIT_S
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() not in ("wal", "memory"):
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(WAL_RETRY_S)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_db_outage(exc: BaseException) -> bool:
    """A database error that means "unreachable" (connect refused, connection lost, pool exhausted,
    SQLite locked), as opposed to a bug such as a constraint violation."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
