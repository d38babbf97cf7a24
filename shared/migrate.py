"""Bring a database to the newest schema with Alembic, programmatically (no alembic.ini needed).

Safe to call at every start: already-applied revisions are skipped; on PostgreSQL an advisory lock
serializes concurrent starters; for SQLite the database file's folder is created first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url, pool, text

from shared import logs

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_ID = 0x5751_0001  # arbitrary, constant: "stylequeue migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _ensure_sqlite_folder(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply every migration up to ``revision`` (default: the newest)."""
    _ensure_sqlite_folder(database_url)
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            is_pg = conn.dialect.name == "postgresql"
            if is_pg:
                conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()
            try:
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                if is_pg:
                    conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                    conn.commit()
    finally:
        engine.dispose()
    logs.event(
        logger,
        "upgraded",
        kind="migrate",
        revision=revision,
        backend=make_url(database_url).get_backend_name(),
    )


__all__ = ["MIGRATIONS_DIR", "alembic_config", "upgrade"]
