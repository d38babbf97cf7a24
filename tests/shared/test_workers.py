"""The ``workers`` table through ``shared.workers`` on SQLite and PostgreSQL: registration, heartbeats,
status changes, the slots the dispatcher may fill, the operator's summary and pruning."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared import workers
from shared.jobs import JobStatus
from shared.models import Job, StoredImage, Worker, utcnow
from shared.workers import WorkerStatus
from tests.support.jobs import IMAGE

LEASE_S = 15.0


def add(session: Session, node: str, status: WorkerStatus, slots: int = 1, **fields: Any) -> None:
    workers.register(
        session,
        node=node,
        host=node.split("@")[-1],
        device=fields.pop("device", "cpu"),
        weights=fields.pop("weights", "random(seed=0)"),
        capabilities={"masks": True},
        slots=slots,
        status=status,
        **fields,
    )


def age(session: Session, node: str, seconds: float, now: datetime) -> None:
    row = session.get(Worker, node)
    assert row is not None
    row.heartbeat_at = now - timedelta(seconds=seconds)
    session.flush()


def test_register_is_an_upsert_that_starts_afresh(sessions: sessionmaker[Session]) -> None:
    then = utcnow() - timedelta(hours=1)
    with sessions() as s:
        add(s, "gpu0@h", WorkerStatus.UNHEALTHY, detail="run `stylequeue weights fetch`", now=then)
        s.commit()
    with sessions() as s:
        add(s, "gpu0@h", WorkerStatus.STARTING, slots=4, device="cuda:0", weights="/w/vgg19.pth")
        s.commit()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Worker)) == 1
        row = s.get(Worker, "gpu0@h")
        assert row is not None
        assert (row.status, row.detail, row.slots, row.device, row.weights, row.host) == (
            "starting",
            None,
            4,
            "cuda:0",
            "/w/vgg19.pth",
            "h",
        )
        assert row.capabilities == {"masks": True}
        assert workers.status_of(s, "gpu0@h") is WorkerStatus.STARTING
        assert workers.status_of(s, "nobody@h") is None


def test_register_refuses_an_unknown_status(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, pytest.raises(ValueError):
        add(s, "cpu@h", "ready")  # type: ignore[arg-type]


def test_beat_moves_the_heartbeat_and_says_when_the_row_is_gone(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        add(s, "cpu@h", WorkerStatus.HEALTHY, now=now - timedelta(minutes=5))
        s.commit()
    with sessions() as s:
        assert workers.beat(s, "cpu@h", now=now)
        assert not workers.beat(s, "gone@h", now=now)
        s.commit()
    with sessions() as s:
        assert workers.healthy_slots(s, now=now, lease_s=LEASE_S) == 1
        assert workers.unregister(s, "cpu@h")
        assert not workers.unregister(s, "cpu@h")
        assert not workers.beat(s, "cpu@h")
        s.commit()


def test_set_status_guarded_never_turns_unhealthy_healthy(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        add(s, "cpu@h", WorkerStatus.STARTING)
        assert workers.set_status(s, "cpu@h", WorkerStatus.HEALTHY, only_from=(WorkerStatus.STARTING,))
        assert workers.set_status(s, "cpu@h", WorkerStatus.UNHEALTHY, "the pool cannot load the engine")
        late = workers.set_status(s, "cpu@h", WorkerStatus.HEALTHY, only_from=(WorkerStatus.STARTING,))
        assert not late
        assert not workers.set_status(s, "nobody@h", WorkerStatus.STOPPING)
        s.commit()
    with sessions() as s:
        row = s.get(Worker, "cpu@h")
        assert row is not None
        assert (row.status, row.detail) == ("unhealthy", "the pool cannot load the engine")


def test_healthy_slots_count_only_fresh_healthy_workers(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        assert workers.healthy_slots(s, now=now, lease_s=LEASE_S) == 0
        add(s, "fresh@a", WorkerStatus.HEALTHY, slots=3, now=now)
        add(s, "edge@a", WorkerStatus.HEALTHY, slots=10, now=now)
        add(s, "stale@b", WorkerStatus.HEALTHY, slots=5, now=now)
        add(s, "sick@c", WorkerStatus.UNHEALTHY, slots=7, now=now, detail="no weights")
        add(s, "boot@d", WorkerStatus.STARTING, slots=2, now=now)
        add(s, "bye@e", WorkerStatus.STOPPING, slots=4, now=now)
        age(s, "edge@a", LEASE_S, now)  # exactly the lease: still alive
        age(s, "stale@b", LEASE_S + 1, now)
        s.commit()
    with sessions() as s:
        assert workers.healthy_slots(s, now=now, lease_s=LEASE_S) == 13
        assert workers.healthy_slots(s, now=now, lease_s=LEASE_S - 1) == 3
        assert workers.healthy_slots(s, now=now + timedelta(minutes=1), lease_s=LEASE_S) == 0


def _running(s: Session, holder: str | None, status: JobStatus = JobStatus.RUNNING) -> None:
    s.add(Job(tenant_id="t1", content_image_id=IMAGE, style_image_ids=[IMAGE], status=status, worker=holder))


def test_summary_classifies_workers_and_counts_their_running_jobs(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        s.add(StoredImage(id=IMAGE, format="PNG", width=8, height=8, bytes=1, storage_key=f"images/{IMAGE}"))
        add(s, "gpu0@a", WorkerStatus.HEALTHY, slots=2, now=now, device="cuda:0")
        add(s, "gpu1@a", WorkerStatus.HEALTHY, slots=2, now=now)
        add(s, "cpu@b", WorkerStatus.UNHEALTHY, now=now, detail="run `stylequeue weights fetch`")
        add(s, "old@c", WorkerStatus.UNHEALTHY, now=now, detail="long gone")
        add(s, "boot@d", WorkerStatus.STARTING, now=now)
        add(s, "bye@e", WorkerStatus.STOPPING, now=now)
        age(s, "gpu1@a", 60, now)
        age(s, "old@c", 3600, now)
        age(s, "gpu0@a", 1.5, now)
        for holder in ("gpu0@a#11", "gpu0@a#12", "bye@e#3"):
            _running(s, holder)
        _running(s, "gpu0@a#13", JobStatus.SUCCEEDED)  # finished: not running any more
        _running(s, None, JobStatus.QUEUED)
        s.commit()
    with sessions() as s:
        got = workers.summary(s, now=now, lease_s=LEASE_S)
        slots = workers.healthy_slots(s, now=now, lease_s=LEASE_S)
    assert (got.healthy, got.unhealthy, got.lost, got.starting, got.stopping) == (1, 2, 1, 1, 1)
    assert got.stale == got.lost == 1
    assert got.slots == 2 == slots
    views = {v.id: v for v in got.workers}
    assert [v.id for v in got.workers] == sorted(views)
    gpu0 = views["gpu0@a"]
    assert (gpu0.status, gpu0.lost, gpu0.running, gpu0.device, gpu0.host) == (
        "healthy",
        False,
        2,
        "cuda:0",
        "a",
    )
    assert gpu0.heartbeat_age_s == pytest.approx(1.5, abs=0.01)
    assert views["bye@e"].running == 1
    assert views["gpu1@a"].lost and views["gpu1@a"].running == 0
    assert views["cpu@b"].detail == "run `stylequeue weights fetch`" and not views["cpu@b"].lost
    assert views["old@c"].status is WorkerStatus.UNHEALTHY and views["old@c"].lost


def test_prune_deletes_only_long_silent_rows(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions() as s:
        for node, seconds in (("alive@a", 0), ("lost@b", 60), ("dead@c", 7200), ("refused@d", 90000)):
            add(s, node, WorkerStatus.HEALTHY, now=now)
            age(s, node, seconds, now)
        s.commit()
    with sessions() as s:
        assert workers.prune(s, now=now, older_than=3600) == 2
        s.commit()
    with sessions() as s:
        assert sorted(s.scalars(select(Worker.id))) == ["alive@a", "lost@b"]
