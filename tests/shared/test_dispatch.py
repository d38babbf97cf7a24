"""Fair dispatch on real databases: room from the registered workers, fair order across tenants by
cost, FIFO and priority within a tenant, caps, and concurrent passes that never publish a job twice."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.dispatch import Among, dispatch_once, fair_picks
from shared.jobs import JobStatus
from shared.models import Job, StoredImage, Tenant, Worker, utcnow
from shared.settings import Settings
from tests.support.jobs import IMAGE

T0 = utcnow() - timedelta(hours=1)


@pytest.fixture
def sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """Tenants t1 and t2 and one stored image; no worker yet."""
    with sessions() as s:
        s.add(StoredImage(id=IMAGE, format="PNG", width=32, height=32, bytes=10, storage_key="images/x"))
        s.add(Tenant(id="t3", name="t3"))
        s.commit()
    return sessions


def settings(**overrides: Any) -> Settings:
    return Settings(database_url="sqlite://", **overrides)


def add_worker(
    sessions: sessionmaker[Session],
    node: str = "w1",
    slots: int = 1,
    status: str = "healthy",
    beat: datetime | None = None,
) -> None:
    with sessions() as s:
        s.add(
            Worker(
                id=node,
                host="h",
                device="cpu",
                weights="random",
                capabilities={},
                slots=slots,
                status=status,
                heartbeat_at=beat or utcnow(),
            )
        )
        s.commit()


def add_jobs(
    sessions: sessionmaker[Session], tenant: str, n: int, *, cost: int = 100, start: int = 0, **fields: Any
) -> list[str]:
    """``n`` waiting jobs of ``tenant``, created in order (one second apart from ``start``)."""
    jobs = [
        Job(
            tenant_id=tenant,
            content_image_id=IMAGE,
            style_image_ids=[IMAGE],
            cost=cost,
            created_at=T0 + timedelta(seconds=start + i),
            **fields,
        )
        for i in range(n)
    ]
    with sessions() as s:
        s.add_all(jobs)
        s.commit()
        return [j.id for j in jobs]


class Broker:
    """A publish function that records what it was given (and can refuse)."""

    def __init__(self, take: int | None = None) -> None:
        self.sent: list[str] = []
        self.take = take
        self.lock = threading.Lock()

    def __call__(self, job_ids: Sequence[str]) -> list[str]:
        with self.lock:
            taken = list(job_ids if self.take is None else job_ids[: self.take])
            self.sent.extend(taken)
            return taken


def start(sessions: sessionmaker[Session], job_ids: Sequence[str], process: str | None = None) -> None:
    """Workers took these jobs (running): one worker process each, or all in ``process`` (a group)."""
    with sessions() as s:
        for i, job_id in enumerate(job_ids):
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status=JobStatus.RUNNING,
                    started_at=utcnow(),
                    heartbeat_at=utcnow(),
                    attempt=1,
                    worker=process or f"w@test#{i}-{job_id[:8]}",
                )
            )
        s.commit()


def finish(sessions: sessionmaker[Session], job_ids: Sequence[str]) -> None:
    with sessions() as s:
        s.execute(update(Job).where(Job.id.in_(list(job_ids))).values(status=JobStatus.SUCCEEDED))
        s.commit()


def test_no_healthy_worker_means_nothing_is_published(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "t1", 3)
    add_worker(sessions, "sick", slots=4, status="unhealthy")
    add_worker(sessions, "dead", slots=4, beat=utcnow() - timedelta(minutes=5))
    broker = Broker()
    report = dispatch_once(sessions, broker, settings())
    assert report.room == 0 and broker.sent == []


def test_room_is_free_slots_minus_messages_out(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, "t1", 10)
    add_worker(sessions, "w1", slots=2)
    add_worker(sessions, "w2", slots=1)
    broker = Broker()
    assert dispatch_once(sessions, broker, settings()).published == ids[:3]  # FIFO within a tenant
    assert dispatch_once(sessions, broker, settings()).published == []  # three messages out
    start(sessions, ids[:2])
    assert dispatch_once(sessions, broker, settings()).published == []  # two running, one out
    finish(sessions, ids[:1])
    assert dispatch_once(sessions, broker, settings()).published == [ids[3]]  # a slot freed
    # dispatch_ahead keeps that many more messages per slot in the broker
    assert dispatch_once(sessions, broker, settings(dispatch_ahead=1)).published == ids[4:7]


def test_a_process_running_a_group_holds_one_slot(sessions: sessionmaker[Session]) -> None:
    """A GPU worker runs the jobs of a group in one process (worker.batch): one slot, not one per job."""
    ids = add_jobs(sessions, "t1", 10)
    add_worker(sessions, "gpu0", slots=3)
    broker = Broker()
    assert dispatch_once(sessions, broker, settings()).published == ids[:3]
    start(sessions, ids[:1])
    start(sessions, ids[3:7], process="gpu0@box#7")  # it took 4 waiting jobs of its bucket too
    start(sessions, ids[1:2], process="gpu0@box#7")  # ... into its group
    # 3 slots: one message out (ids[2]), two processes busy (6 jobs): no room
    assert dispatch_once(sessions, broker, settings()).published == []
    start(sessions, ids[2:3])
    finish(sessions, ids[:1])
    assert dispatch_once(sessions, broker, settings()).published == [ids[7]]  # one process freed


def test_a_small_tenant_is_not_stuck_behind_a_big_backlog(sessions: sessionmaker[Session]) -> None:
    big = add_jobs(sessions, "t1", 200, cost=100)
    add_worker(sessions, "w1", slots=2)
    broker = Broker()
    assert dispatch_once(sessions, broker, settings()).published == big[:2]
    start(sessions, big[:2])
    small = add_jobs(sessions, "t2", 5, cost=100, start=500)  # submitted after all of t1's
    assert dispatch_once(sessions, broker, settings()).published == []  # no slot free
    finish(sessions, big[:1])  # one slot frees: it goes to t2, who has nothing in flight
    assert dispatch_once(sessions, broker, settings()).published == [small[0]]
    assert len(broker.sent) == 3  # the broker never held t1's backlog


def test_slots_are_shared_by_cost_over_the_window(sessions: sessionmaker[Session]) -> None:
    """t1's jobs cost 10x t2's: over many picks t2 gets ~10 jobs per job of t1."""
    heavy = add_jobs(sessions, "t1", 50, cost=1000)
    light = add_jobs(sessions, "t2", 50, cost=100)
    with sessions() as s:
        picks = fair_picks(s, 22, settings(), utcnow())
    assert sum(p in heavy for p in picks) == 2 and sum(p in light for p in picks) == 20
    # Within each tenant: submission order.
    assert [p for p in picks if p in light] == light[:20]


def test_weight_and_priority_and_max_running(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        s.execute(update(Tenant).where(Tenant.id == "t1").values(weight=3))
        s.execute(update(Tenant).where(Tenant.id == "t3").values(max_running=1))
        s.commit()
    t1 = add_jobs(sessions, "t1", 10)
    t2 = add_jobs(sessions, "t2", 10)
    urgent = add_jobs(sessions, "t2", 1, start=100, priority=5)[0]  # last in, first in t2's line
    t3 = add_jobs(sessions, "t3", 10)
    with sessions() as s:
        picks = fair_picks(s, 9, settings(), utcnow())
    assert sum(p in t1 for p in picks) == 6  # weight 3: three times t2's share
    assert [p for p in picks if p in t2 or p == urgent] == [urgent, t2[0]]
    assert [p for p in picks if p in t3] == [t3[0]]  # capped at one in flight
    # The setting caps every tenant without an override.
    with sessions() as s:
        capped = fair_picks(s, 9, settings(tenant_max_running=2), utcnow())
    assert sum(p in t2 or p == urgent for p in capped) == 2


def test_deleted_canceled_and_published_jobs_are_not_picked(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, "t1", 1, deleted_at=utcnow())
    add_jobs(sessions, "t1", 1, status=JobStatus.CANCELED)
    add_jobs(sessions, "t1", 1, published_at=utcnow())
    waiting = add_jobs(sessions, "t1", 1, start=10)
    add_worker(sessions, "w1", slots=5)
    assert dispatch_once(sessions, Broker(), settings()).published == waiting


def test_a_refused_publish_leaves_the_job_waiting(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, "t1", 3)
    add_worker(sessions, "w1", slots=3)
    report = dispatch_once(sessions, Broker(take=1), settings())
    assert report.published == ids[:1]
    with sessions() as s:
        unpublished = s.scalars(select(Job.id).where(Job.published_at.is_(None))).all()
    assert sorted(unpublished) == sorted(ids[1:])
    assert dispatch_once(sessions, Broker(), settings()).published == ids[1:]


def test_concurrent_passes_never_publish_a_job_twice(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, "t1", 40)
    add_worker(sessions, "w1", slots=40)
    broker = Broker()
    threads = [threading.Thread(target=dispatch_once, args=(sessions, broker, settings())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(broker.sent) == sorted(ids)  # each exactly once


def test_one_pass_sends_lost_and_requeued_jobs_only_into_free_slots(sessions: sessionmaker[Session]) -> None:
    """The reconcile step makes them waiting again; the dispatch step of the same pass publishes as
    many as there are free slots, so the broker never piles up copies while workers are away."""
    from shared.dispatcher import one_pass

    lost = add_jobs(sessions, "t1", 2, published_at=utcnow() - timedelta(minutes=5))
    dead = add_jobs(
        sessions, "t2", 1, status=JobStatus.RUNNING, attempt=1, heartbeat_at=utcnow() - timedelta(minutes=5)
    )
    broker = Broker()
    report = one_pass(sessions, broker, settings())  # no worker yet: nothing is sent
    assert sorted(report.reconciled.lost) == sorted(lost) and report.reconciled.requeued == dead
    assert broker.sent == []
    add_worker(sessions, "w1", slots=2)
    again = one_pass(sessions, broker, settings())
    assert again.reconciled.lost == [] and len(broker.sent) == 2  # two free slots, fair order
    assert {lost[0], dead[0]} == set(broker.sent)


def test_picks_within_a_bucket_keep_the_fair_order(sessions: sessionmaker[Session]) -> None:
    """A GPU worker filling its group takes only its bucket's jobs that start at its scale, still
    in fair order."""
    a1 = add_jobs(sessions, "t1", 4, bucket="a")
    add_jobs(sessions, "t1", 4, bucket="b", start=10)
    a2 = add_jobs(sessions, "t2", 2, bucket="a", start=20)
    later = add_jobs(sessions, "t2", 2, bucket="a", start=30, resume_scale=2)
    with sessions() as s:
        picks = fair_picks(s, 5, settings(), utcnow(), among=Among("a"))
        resumed = fair_picks(s, 5, settings(), utcnow(), among=Among("a", resume_scale=2))
        everything = fair_picks(s, 20, settings(), utcnow())
    assert picks == [a1[0], a2[0], a1[1], a2[1], a1[2]]  # the tenants alternate (equal costs)
    assert resumed == later
    assert len(everything) == 12
