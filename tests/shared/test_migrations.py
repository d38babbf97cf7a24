"""Data migration 0003: unfinished jobs from before relative loss terms keep the raw terms."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from shared.migrate import upgrade

NOW = "2026-01-01 00:00:00+00:00"
# id: (status, params before) -> loss_terms after (None: the field stays absent)
JOBS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "queued_raw": ("queued", {"style_weight": 1e6}, "raw"),
    "running": ("running", {}, "raw"),
    "explicit": ("queued", {"loss_terms": "relative"}, "relative"),
    "done": ("succeeded", {"style_weight": 1e6}, None),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    from tests.support.servers import port_open, require, temporary_database

    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    with temporary_database("sq_loss_terms") as url:
        yield url


def test_unfinished_jobs_get_raw_loss_terms(old_db: str) -> None:
    upgrade(old_db, "0002")
    engine = create_engine(old_db)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :n)"), {"n": NOW})
        conn.execute(text("INSERT INTO images VALUES ('i', 'PNG', 64, 48, 1, 'images/i', :n)"), {"n": NOW})
        for job_id, (status, params, _) in JOBS.items():
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, status, params, content_image_id, style_image_ids, "
                    "progress, attempt, max_attempts, cancel_requested, checkpoints, created_at, "
                    "updated_at) VALUES (:id, 't', :s, :p, 'i', '[\"i\"]', '{}', 0, 3, false, '[]', :n, :n)"
                ),
                {"id": job_id, "s": status, "p": json.dumps(params), "n": NOW},
            )
    upgrade(old_db)
    with engine.connect() as conn:
        rows: dict[str, Any] = dict(conn.execute(text("SELECT id, params FROM jobs")).all())
    engine.dispose()
    for job_id, (_, before, after) in JOBS.items():
        params = rows[job_id] if isinstance(rows[job_id], dict) else json.loads(rows[job_id])
        assert params.get("loss_terms") == after, (job_id, params)
        later = ("loss_terms", "exact_aspect")  # exact_aspect: migration 0005, tested below
        assert {k: v for k, v in params.items() if k not in later} == {
            k: v for k, v in before.items() if k not in later
        }


def test_emptied_marks_move_from_progress_to_their_column(old_db: str) -> None:
    """Migration 0005: ``progress["result_expired_at"]`` becomes ``jobs.emptied_at``."""
    upgrade(old_db, "0004")
    engine = create_engine(old_db)
    marks = {
        "emptied": {"loss": 1.5, "result_expired_at": "2026-11-30T10:00:00+00:00"},
        "kept": {"loss": 2.0},
    }
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :n)"), {"n": NOW})
        conn.execute(text("INSERT INTO images VALUES ('i', 'PNG', 64, 48, 1, 'images/i', :n)"), {"n": NOW})
        for job_id, progress in marks.items():
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, status, params, content_image_id, style_image_ids, "
                    "progress, attempt, max_attempts, cancel_requested, checkpoints, created_at, "
                    "updated_at) VALUES (:id, 't', 'succeeded', '{}', 'i', '[\"i\"]', :p, 1, 3, false, "
                    "'[]', :n, :n)"
                ),
                {"id": job_id, "p": json.dumps(progress), "n": NOW},
            )
    upgrade(old_db)
    with engine.connect() as conn:
        rows = {r[0]: r[1:] for r in conn.execute(text("SELECT id, progress, emptied_at FROM jobs")).all()}
    engine.dispose()
    progress = {k: v if isinstance(v, dict) else json.loads(v) for k, (v, _) in rows.items()}
    assert progress == {"emptied": {"loss": 1.5}, "kept": {"loss": 2.0}}
    assert rows["emptied"][1] is not None and str(rows["emptied"][1]).startswith("2026-11-30")
    assert rows["kept"][1] is None


def test_unfinished_jobs_keep_their_exact_aspect(old_db: str) -> None:
    """Migration 0005: jobs queued or running keep the aspect ratio they were submitted (and
    checkpointed) with; finished ones are left as they were."""
    upgrade(old_db, "0004")
    engine = create_engine(old_db)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :n)"), {"n": NOW})
        conn.execute(text("INSERT INTO images VALUES ('i', 'PNG', 64, 48, 1, 'images/i', :n)"), {"n": NOW})
        for job_id, status in (("q", "queued"), ("r", "running"), ("s", "succeeded")):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, status, params, content_image_id, style_image_ids, "
                    "progress, attempt, max_attempts, cancel_requested, checkpoints, created_at, "
                    "updated_at) VALUES (:id, 't', :s, '{\"size\": 64}', 'i', '[\"i\"]', '{}', 0, 3, "
                    "false, '[]', :n, :n)"
                ),
                {"id": job_id, "s": status, "n": NOW},
            )
    upgrade(old_db)
    with engine.connect() as conn:
        rows: dict[str, Any] = dict(conn.execute(text("SELECT id, params FROM jobs")).all())
    engine.dispose()
    params = {k: v if isinstance(v, dict) else json.loads(v) for k, v in rows.items()}
    assert params == {
        "q": {"size": 64, "exact_aspect": True},
        "r": {"size": 64, "exact_aspect": True},
        "s": {"size": 64},
    }


def _insert_jobs(engine: Engine, rows: dict[str, dict[str, Any]]) -> None:
    """A tenant, an image and these jobs, in raw SQL (the schema of an old revision): per job id its
    status ``s`` (running), ``attempt`` a (1), ``max_attempts`` m (3) and checkpoints ``c`` ([])."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :n)"), {"n": NOW})
        conn.execute(text("INSERT INTO images VALUES ('i', 'PNG', 64, 48, 1, 'images/i', :n)"), {"n": NOW})
        for job_id, values in rows.items():
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, status, params, content_image_id, style_image_ids, "
                    "progress, attempt, max_attempts, cancel_requested, checkpoints, created_at, "
                    "updated_at) VALUES (:id, 't', :s, '{}', 'i', '[\"i\"]', '{}', :a, :m, false, "
                    ":c, :n, :n)"
                ),
                {"id": job_id, "s": "running", "a": 1, "m": 3, "c": "[]", "n": NOW, **values},
            )


def test_handbacks_are_estimated_for_jobs_made_before_the_column(old_db: str) -> None:
    """Migration 0007: ``jobs.handbacks`` for existing rows is max_attempts above the default (3),
    at most the attempts made; later hand-backs are counted exactly."""
    upgrade(old_db, "0006")
    engine = create_engine(old_db)
    rows = {"plain": (2, 3), "handed_twice": (4, 5), "capped": (1, 6)}  # id: (attempt, max_attempts)
    _insert_jobs(engine, {j: {"a": a, "m": m} for j, (a, m) in rows.items()})
    upgrade(old_db)
    with engine.connect() as conn:
        got: dict[str, int] = {
            str(i): int(h) for i, h in conn.execute(text("SELECT id, handbacks FROM jobs"))
        }
    engine.dispose()
    assert got == {"plain": 0, "handed_twice": 2, "capped": 1}


def test_unfinished_jobs_with_checkpoints_get_the_scale_they_resume_at(old_db: str) -> None:
    """Migration 0009: ``jobs.resume_scale`` from each unfinished job's latest checkpoint (the next
    scale after one that ended its scale); finished jobs and jobs without checkpoints start at 0."""
    upgrade(old_db, "0008")
    engine = create_engine(old_db)
    mid = [{"key": "a", "scale": 0, "end_of_scale": True}, {"key": "b", "scale": 2, "end_of_scale": False}]
    rows = {  # id: (status, checkpoints)
        "mid_scale": ("queued", mid),
        "scale_end": ("running", [{"key": "c", "scale": 1, "end_of_scale": True}]),
        "fresh": ("queued", []),
        "done": ("succeeded", mid),
    }
    _insert_jobs(engine, {j: {"s": status, "c": json.dumps(refs)} for j, (status, refs) in rows.items()})
    upgrade(old_db)
    with engine.connect() as conn:
        got = {str(i): int(s) for i, s in conn.execute(text("SELECT id, resume_scale FROM jobs"))}
    engine.dispose()
    assert got == {"mid_scale": 2, "scale_end": 2, "fresh": 0, "done": 0}
