"""shared.jobstore and its sibling jobstore modules, the one writer of job rows, on SQLite and
PostgreSQL: every write changes a row only in the states the transition table allows, terminal rows
never change, and no other module writes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared import jobstore, jobstore_queue
from shared.db import get_sessionmaker
from shared.jobs import ALLOWED, TERMINAL, JobStatus, can_transition, sources_for
from shared.jobstore import CancelResult, JobSpec, Seen
from shared.models import Job, utcnow
from shared.reconcile import reconcile_once
from tests.support.jobs import IMAGE, MakeJob
from worker import jobstore as worker_jobstore

REPO = Path(__file__).resolve().parents[2]
Q, R, S, F, C = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELED,
)
HELD_ONLY, QUEUED_ONLY = frozenset({R}), frozenset({Q})
LIVE = frozenset(JobStatus) - TERMINAL
PUBLISHED = datetime(2024, 1, 1, tzinfo=timezone.utc)
STALE = timedelta(hours=1)


def to(
    new: JobStatus, within: frozenset[JobStatus] = frozenset(JobStatus)
) -> dict[JobStatus, JobStatus | None]:
    """A move to ``new`` from every state the table allows (narrowed to ``within``)."""
    return {s: new for s in sources_for(new) & within}


def stay(states: frozenset[JobStatus]) -> dict[JobStatus, JobStatus | None]:
    """A write that changes other columns of rows in these states, never their status."""
    return {s: s for s in states}


@dataclass(frozen=True)
class Case:
    call: Callable[[Session, str, JobStatus], object]  # (session, job id, its status as read)
    changes: dict[JobStatus, JobStatus | None]  # status before → after (None: deleted) if it changes
    fields: dict[str, Any] = field(default_factory=dict)  # the row's set-up, over ROW


ROW: dict[str, Any] = {"attempt": 1, "max_attempts": 3, "worker": "w@h#1", "published_at": PUBLISHED}
UNPUBLISHED = {"published_at": None}

CASES: dict[str, Case] = {
    "claim": Case(lambda s, j, _: jobstore.claim(s, _load(s, j), "me@h#2"), to(R)),
    "heartbeat": Case(lambda s, j, _: jobstore.heartbeat(s, j, 1, {"step": 1}), stay(HELD_ONLY)),
    "record_checkpoints": Case(
        lambda s, j, _: jobstore.record_checkpoints(s, j, 1, [{"key": "k"}]), stay(HELD_ONLY)
    ),
    "succeed": Case(lambda s, j, _: jobstore.succeed(s, j, 1, "jobs/x/result.png", {}), to(S, HELD_ONLY)),
    "fail": Case(lambda s, j, _: jobstore.fail(s, j, 1, "bad", "bad input", False), to(F, HELD_ONLY)),
    "cancel": Case(lambda s, j, _: jobstore.cancel(s, j, 1), to(C, HELD_ONLY)),
    "release": Case(lambda s, j, _: jobstore.release(s, j, 1, graceful=False), to(Q, HELD_ONLY)),
    "release_graceful": Case(lambda s, j, _: jobstore.release(s, j, 1, graceful=True), to(Q, HELD_ONLY)),
    "fail_released": Case(
        lambda s, j, _: jobstore.fail_released(s, j, "unavailable", "gave up"), to(F, QUEUED_ONLY)
    ),
    "cancel_unheld": Case(lambda s, j, st: jobstore.cancel_unheld(s, Seen(j, st, 1)), to(C)),
    "fail_lost": Case(lambda s, j, st: jobstore.fail_lost(s, Seen(j, st, 1), 1), to(F)),
    "requeue": Case(lambda s, j, st: jobstore_queue.requeue(s, Seen(j, st, 1, lease_cutoff=utcnow())), to(Q)),
    "request_cancel": Case(
        lambda s, j, _: jobstore.request_cancel(s, "t1", j),
        {**to(C, QUEUED_ONLY), **stay(sources_for(C) & HELD_ONLY)},
    ),
    "claim_dispatch": Case(
        lambda s, j, _: jobstore_queue.claim_dispatch(s, [j], utcnow()), stay(QUEUED_ONLY), UNPUBLISHED
    ),
    "unclaim_dispatch": Case(
        lambda s, j, _: jobstore_queue.unclaim_dispatch(s, [j], PUBLISHED), stay(QUEUED_ONLY)
    ),
    "forget_message": Case(lambda s, j, _: jobstore_queue.forget_message(s, j, PUBLISHED), stay(QUEUED_ONLY)),
    "delete_unpublished": Case(
        lambda s, j, _: jobstore_queue.delete_unpublished(s, [j]), {Q: None}, UNPUBLISHED
    ),
}


def _load(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    assert job is not None
    return job


def _row(url: str, job_id: str) -> dict[str, Any] | None:
    with get_sessionmaker(url)() as s:
        job = s.get(Job, job_id)
        return None if job is None else {c.key: getattr(job, c.key) for c in Job.__table__.columns}


def _load_status(url: str, job_id: str) -> JobStatus:
    row = _row(url, job_id)
    assert row is not None
    return JobStatus(row["status"])


def _run(
    url: str, make_job: MakeJob, case: Case, status: JobStatus
) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """A row in ``status`` (lease long expired), the case's write on it; the row before and after."""
    job_id = make_job(**{**ROW, "status": status, "heartbeat_at": utcnow() - STALE, **case.fields})
    before = _row(url, job_id)
    with get_sessionmaker(url)() as s:
        case.call(s, job_id, status)
        s.commit()
    return job_id, before, _row(url, job_id)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_write_changes_a_row_only_where_the_table_allows(
    name: str, db_url: str, make_job: MakeJob
) -> None:
    case = CASES[name]
    for status in JobStatus:
        job_id, before, after = _run(db_url, make_job, case, status)
        assert before is not None
        if status not in case.changes:
            assert after == before, f"{name} changed a {status} row"
            continue
        new = case.changes[status]
        if new is None:
            assert after is None, f"{name} kept a {status} row"
            continue
        assert after is not None and after != before, f"{name} left a {status} row as it was"
        assert after["status"] is new, f"{name}: {status} → {after['status']}, expected {new}"
        assert new == status or can_transition(status, new)


def test_terminal_rows_never_change(db_url: str, make_job: MakeJob) -> None:
    for name, case in CASES.items():
        assert not TERMINAL & case.changes.keys(), name
        for status in TERMINAL:
            _, before, after = _run(db_url, make_job, case, status)
            assert after == before, f"{name} changed a {status} row"


def test_guards_are_built_from_the_table(
    db_url: str, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Take queued → running and queued → canceled out of the table: the claim and the cancel of a
    queued job stop matching, though nothing else changed."""
    monkeypatch.setitem(ALLOWED, Q, frozenset({F}))
    job_id = make_job(**ROW, status=Q)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.claim(s, _load(s, job_id), "me@h#2") is None
        assert not jobstore.cancel_unheld(s, Seen(job_id, Q, 1))
        s.commit()
    assert _load_status(db_url, job_id) is Q


def test_a_write_on_a_row_that_changed_since_it_was_read_matches_nothing(
    db_url: str, make_job: MakeJob
) -> None:
    fresh = make_job(**ROW, status=R, heartbeat_at=utcnow())
    stale = make_job(**ROW, status=R, heartbeat_at=utcnow() - STALE)
    with get_sessionmaker(db_url)() as s:
        assert not jobstore_queue.requeue(
            s, Seen(fresh, R, 1, lease_cutoff=utcnow() - STALE / 2)
        )  # a heartbeat since the cutoff: not lost
        assert not jobstore.fail_lost(s, Seen(stale, R, 2), 2)  # another attempt
        assert not jobstore.cancel_unheld(s, Seen(stale, Q, 1))  # another status
        assert not jobstore.succeed(s, stale, 2, "k", {})  # not the holder's attempt
        assert not jobstore.heartbeat(s, stale, 0)
        s.commit()
    assert _load_status(db_url, fresh) is R and _load_status(db_url, stale) is R


def test_insert_queued_then_dispatch_then_delete_the_unpublished(db_url: str, make_job: MakeJob) -> None:
    specs = [
        JobSpec(IMAGE, (IMAGE,)),
        JobSpec(IMAGE, (IMAGE, IMAGE), (IMAGE, IMAGE)),
        JobSpec(IMAGE, (IMAGE,)),
    ]
    with get_sessionmaker(db_url)() as s:
        ids = jobstore.insert_queued(
            s, tenant_id="t1", batch_id=None, specs=specs, params={"size": 64}, max_attempts=5
        )
        s.commit()
        jobs = [_load(s, i) for i in ids]
        assert [j.status for j in jobs] == [Q, Q, Q] and all(type(j.status) is JobStatus for j in jobs)
        assert sorted(jobs, key=lambda j: (j.created_at, j.id)) == jobs
        assert (jobs[1].mask_image_ids, jobs[0].mask_image_ids, jobs[0].max_attempts) == (
            [IMAGE, IMAGE],
            None,
            5,
        )
        stored = s.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": ids[0]}).scalar()
        assert type(stored) is str and stored == "queued"  # the same string as before the enum
        now = utcnow()
        assert (
            jobstore_queue.claim_dispatch(s, ids[:1], now) == ids[:1]
            and jobstore_queue.claim_dispatch(s, ids[:1], now) == []
        )
        assert jobstore_queue.delete_unpublished(s, ids) == 2
        s.commit()
    assert [_row(db_url, i) is not None for i in ids] == [True, False, False]


def test_request_cancel(db_url: str, make_job: MakeJob) -> None:
    queued, running, done = make_job(status=Q), make_job(**ROW, status=R), make_job(status=S)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.request_cancel(s, "t2", queued) is None  # another tenant's job
        assert jobstore.request_cancel(s, "t1", queued) is CancelResult.CANCELED
        assert jobstore.request_cancel(s, "t1", running) is CancelResult.REQUESTED
        assert jobstore.request_cancel(s, "t1", done) is None
        s.commit()
        q, r = _load(s, queued), _load(s, running)
        assert (q.status, q.cancel_requested, q.finished_at is not None) == (C, True, True)
        assert (r.status, r.cancel_requested, r.finished_at) == (R, True, None)


def test_worker_lost_is_written_once_whoever_notices(db_url: str, make_job: MakeJob) -> None:
    """A new delivery's claim and the reconciler fail a job out of attempts with the same facts."""
    spent = {
        "status": R,
        "attempt": 3,
        "max_attempts": 3,
        "worker": "gpu1@elsewhere#4242",
        "heartbeat_at": utcnow() - STALE,
    }
    by_claim, by_reconciler = make_job(**spent), make_job(**spent)
    got = worker_jobstore.claim(db_url, by_claim, "cpu@here#1", 60)
    assert got is worker_jobstore.Drop.EXHAUSTED
    report = reconcile_once(get_sessionmaker(db_url), publish_grace_s=30, lease_s=60)
    assert report.failed == [by_reconciler]
    facts = [_row(db_url, j) for j in (by_claim, by_reconciler)]
    keys = ("status", "error_code", "error_message", "error_retryable", "attempt")
    first, second = ([row[k] for k in keys] for row in facts if row is not None)
    assert (
        first
        == second
        == [
            F,
            "worker_lost",
            "the worker running this job was lost 3 times (max_attempts=3); its checkpoints are kept",
            False,
            3,
        ]
    )


def test_worker_lost_counts_losses_not_hand_backs(db_url: str, make_job: MakeJob) -> None:
    """Two hand-backs (a rolling restart, a retried outage) raised max_attempts to 5; the worker was
    lost in the other 3 attempts: the message says 3 of 3, as the tenant's limit is 3."""
    job_id = make_job(status=R, attempt=5, max_attempts=5, handbacks=2, worker="w@h#1")
    with get_sessionmaker(db_url)() as s:
        assert jobstore.fail_lost(s, Seen(job_id, R, 5), 5, handbacks=2)
        s.commit()
        job = s.get(Job, job_id)
        assert job is not None and job.error_message is not None
        assert job.error_message.startswith("the worker running this job was lost 3 times (max_attempts=3)")


def test_the_checkpoint_list_sets_the_scale_a_job_resumes_at(db_url: str, make_job: MakeJob) -> None:
    """``resume_scale`` follows the latest ref (the next scale after one that ended its scale), so a
    GPU group takes the job only with others that start where it does (shared.dispatch.Among)."""
    job_id = make_job(**ROW, status=R)
    lists = [
        ([{"key": "a", "scale": 0, "end_of_scale": False}], 0),
        ([{"key": "a", "scale": 0}, {"key": "b", "scale": 1, "end_of_scale": True}], 2),
        ([{"key": "c", "scale": 3, "end_of_scale": False}], 3),
    ]
    with get_sessionmaker(db_url)() as s:
        for refs, scale in lists:
            assert jobstore.record_checkpoints(s, job_id, 1, refs)
            s.commit()
            assert _load(s, job_id).resume_scale == scale == jobstore.resume_scale(refs)
        assert not jobstore.record_checkpoints(s, job_id, 2, [])  # fenced: nothing changes
        s.commit()
        assert _load(s, job_id).resume_scale == 3


WRITES = re.compile(r"\b(update|insert|delete)\(\s*Job\s*\)|\.add(_all)?\(\s*Job\(")


def test_no_module_but_shared_jobstore_writes_job_rows() -> None:
    writers = sorted(
        str(path.relative_to(REPO))
        for folder in ("api", "shared", "worker")
        for path in (REPO / folder).rglob("*.py")
        if "migrations" not in path.parts and WRITES.search(path.read_text(encoding="utf-8"))
    )
    assert writers == [
        "shared/jobstore.py",
        "shared/jobstore_deletion.py",
        "shared/jobstore_guards.py",
        "shared/jobstore_queue.py",
    ]
