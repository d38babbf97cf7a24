"""A throwaway PostgreSQL database on the shared server, for tests and benchmarks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PG_ADMIN_DSN = os.environ.get("STYLEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


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
