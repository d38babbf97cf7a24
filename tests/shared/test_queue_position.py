"""A queued job's position in its tenant's line and its ETA (``shared.queue_position``), on SQLite and
PostgreSQL: dispatch order, other tenants and finished or deleted jobs left out, fair-share ETA, and a
page's positions in a fixed number of queries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from shared import queue_position
from shared.jobs import JobStatus
from shared.models import Job, StoredImage, Tenant, utcnow
from tests.support.jobs import IMAGE

T0 = utcnow() - timedelta(hours=1)


@pytest.fixture
def sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    with sessions() as s:
        s.add(StoredImage(id=IMAGE, format="PNG", width=8, height=8, bytes=1, storage_key=f"images/{IMAGE}"))
        s.commit()
    return sessions


def add(s: Session, tenant: str = "t1", at: float = 0.0, **fields: Any) -> Job:
    job = Job(
        tenant_id=tenant,
        content_image_id=IMAGE,
        style_image_ids=[IMAGE],
        created_at=T0 + timedelta(seconds=at),
        **fields,
    )
    s.add(job)
    s.flush()
    return job


def dispatch_order(jobs: list[Job]) -> list[str]:
    return [j.id for j in sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.id))]


def test_positions_follow_dispatch_order_within_the_tenant(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        line = [
            add(s, at=1, priority=0),
            add(s, at=2, priority=5),
            add(s, at=3, priority=0),
            add(s, at=3, priority=0),  # the same instant: the id decides
            add(s, at=0, priority=-1),
            add(s, at=9, priority=5),
        ]
        add(s, "t2", at=0, priority=9)  # another tenant's line
        add(s, at=0, priority=9, status=JobStatus.RUNNING)
        add(s, at=0, priority=9, status=JobStatus.SUCCEEDED)
        add(s, at=0, priority=9, deleted_at=utcnow())  # deleted: out of the line
        s.commit()
        expected = {job_id: i for i, job_id in enumerate(dispatch_order(line))}
        assert {j.id: queue_position.position(s, j) for j in line} == expected
        assert queue_position.positions(s, "t1", [j.id for j in line]) == expected
        assert queue_position.positions(s, "t2", [j.id for j in line]) == {}
        assert queue_position.positions(s, "t1", []) == {}


def finish(s: Session, count: int, now: datetime, ago: timedelta, **fields: Any) -> None:
    for _ in range(count):
        add(
            s,
            "t2",
            status=fields.get("status", JobStatus.SUCCEEDED),
            started_at=None if fields.get("never_started") else now - ago - timedelta(seconds=30),
            finished_at=now - ago,
        )


def test_eta_is_the_tenants_share_of_recent_throughput(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        assert queue_position.eta_seconds(s, "t1", 0, now) is None  # nothing finished: unknown
        finish(s, 20, now, timedelta(minutes=3))
        finish(s, 10, now, timedelta(minutes=14), status=JobStatus.FAILED)
        finish(s, 50, now, timedelta(minutes=20))  # before the window
        finish(s, 50, now, timedelta(minutes=1), status=JobStatus.CANCELED, never_started=True)
        s.commit()
        assert queue_position.finished_since(s, now - queue_position.ETA_WINDOW) == 30
        # 30 jobs in 900 s, t1 alone: one every 30 s
        assert queue_position.eta_seconds(s, "t1", 0, now) == pytest.approx(30.0)
        assert queue_position.eta_seconds(s, "t1", 4, now) == pytest.approx(150.0)
        add(s, "t2", status=JobStatus.RUNNING)  # t2 active too: half each
        s.commit()
        assert queue_position.eta_seconds(s, "t1", 0, now) == pytest.approx(60.0)
        s.execute(update(Tenant).where(Tenant.id == "t2").values(weight=3))
        s.commit()
        assert queue_position.eta_seconds(s, "t1", 0, now) == pytest.approx(120.0)
        s.execute(update(Tenant).where(Tenant.id == "t1").values(weight=3))
        s.commit()
        assert queue_position.eta_seconds(s, "t1", 1, now) == pytest.approx(120.0)


@contextmanager
def counted(s: Session) -> Iterator[list[str]]:
    statements: list[str] = []
    engine = s.get_bind()

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def test_a_page_costs_a_fixed_number_of_queries(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        page = [add(s, at=i, priority=i % 3) for i in range(60)]
        page.append(add(s, at=100, status=JobStatus.RUNNING))
        finish(s, 9, now, timedelta(minutes=1))
        s.commit()
        expected = {job_id: i for i, job_id in enumerate(dispatch_order(page[:60]))}
        with counted(s) as statements:
            spots = queue_position.spots(s, "t1", page, now)
        assert {k: v.position for k, v in spots.items()} == expected
        assert page[-1].id not in spots
        assert all(v.eta_seconds is not None for v in spots.values())
        assert len(statements) <= 4, statements
        with counted(s) as statements:
            one = queue_position.spots(s, "t1", [page[0]], now)
            none = queue_position.spots(s, "t1", [page[-1]], now)
        assert one[page[0].id].position == expected[page[0].id] and none == {}
        assert len(statements) <= 4, statements
