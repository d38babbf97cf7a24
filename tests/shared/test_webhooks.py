"""Webhook events on SQLite and PostgreSQL: emitted in the transaction of the change they report
(shared.webhooks), by every path that starts, checkpoints or ends a job; batch.completed exactly once;
the outbox's due / lease / retry / prune bookkeeping (shared.webhook_outbox); signing secrets."""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from shared import jobstore, jobstore_deletion, webhook_outbox, webhook_secrets, webhooks
from shared.db import get_sessionmaker
from shared.jobs import JobStatus
from shared.jobstore import JobSpec, Seen
from shared.models import Batch, Job, WebhookAttempt, WebhookEvent, utcnow
from tests.support.jobs import IMAGE, MakeJob

HOOK = "https://hooks.example.com/in"


def events(url: str) -> list[tuple[str | None, str | None, str]]:
    with get_sessionmaker(url)() as s:
        rows = s.execute(
            select(WebhookEvent.job_id, WebhookEvent.batch_id, WebhookEvent.event).order_by(
                WebhookEvent.created_at, WebhookEvent.event
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def run(url: str, job_id: str) -> int:
    """Claim the job (as a worker would) and return its attempt."""
    with get_sessionmaker(url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        attempt = jobstore.claim(s, job, "w@h#1")
        s.commit()
    assert attempt is not None
    return attempt


def test_a_job_emits_start_checkpoint_and_completed_as_filtered(db_url: str, make_job: MakeJob) -> None:
    every = make_job(webhook=HOOK, webhook_events=["start", "checkpoint", "completed"])
    default = make_job(webhook=HOOK)  # completed only
    silent = make_job()  # no webhook
    for job_id in (every, default, silent):
        attempt = run(db_url, job_id)
        with get_sessionmaker(db_url)() as s:
            assert jobstore.record_checkpoints(s, job_id, attempt, [{"key": "k", "step": 1}])
            assert jobstore.succeed(s, job_id, attempt, "r", {})
            s.commit()
    got = events(db_url)
    assert sorted(e for j, _, e in got if j == every) == ["checkpoint", "completed", "start"]
    assert [e for j, _, e in got if j == default] == ["completed"]
    assert not [e for j, _, e in got if j == silent]


def test_a_second_attempt_does_not_start_again_and_a_rollback_emits_nothing(
    db_url: str, make_job: MakeJob
) -> None:
    job_id = make_job(webhook=HOOK, webhook_events=["start", "completed"])
    attempt = run(db_url, job_id)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.release(s, job_id, attempt, graceful=True)
        s.commit()
    attempt = run(db_url, job_id)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.fail(s, job_id, attempt, "boom", "it broke", False)
        s.rollback()  # the change did not happen: neither did its event
    assert [e for _, _, e in events(db_url)] == ["start"]


def test_every_path_to_a_terminal_state_emits_completed(db_url: str, make_job: MakeJob) -> None:
    queued_cancel = make_job(webhook=HOOK)
    lost = make_job(webhook=HOOK, status=JobStatus.RUNNING, attempt=3, max_attempts=3)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.request_cancel(s, "t1", queued_cancel) is jobstore.CancelResult.CANCELED
        assert jobstore.fail_lost(s, Seen(lost, JobStatus.RUNNING, 3), 3)
        s.commit()
    assert sorted(str(j) for j, _, e in events(db_url) if e == "completed") == sorted([queued_cancel, lost])


def _batch(url: str, n: int, events_filter: list[str] | None = None) -> tuple[str, list[str]]:
    with get_sessionmaker(url)() as s:
        batch = Batch(tenant_id="t1", job_count=n, webhook=HOOK, webhook_events=events_filter)
        s.add(batch)
        s.flush()
        ids = jobstore.insert_queued(
            s,
            tenant_id="t1",
            batch_id=batch.id,
            specs=[JobSpec(IMAGE, (IMAGE,))] * n,
            params={},
            max_attempts=3,
            webhook=HOOK,
            webhook_events=events_filter,
        )
        s.commit()
        return batch.id, ids


def test_batch_completed_once_when_its_last_job_ends_by_any_path(db_url: str) -> None:
    batch_id, (a, b, c, d) = _batch(db_url, 4)
    attempt = run(db_url, a)
    with get_sessionmaker(db_url)() as s:
        assert jobstore.succeed(s, a, attempt, "r", {})
        s.commit()
    assert [e for _, _, e in events(db_url)] == ["completed"]
    run(db_url, b)
    with get_sessionmaker(db_url)() as s:  # queued c, d canceled at once; running b asked to stop
        jobstore_deletion.cancel_batch(s, "t1", batch_id)
        s.commit()
    assert "batch.completed" not in [e for _, _, e in events(db_url)]
    with get_sessionmaker(db_url)() as s:
        assert jobstore.cancel(s, b, 1)
        s.commit()
    got = events(db_url)
    assert sorted(str(j) for j, _, e in got if e == "completed") == sorted([a, b, c, d])
    assert [(j, bid) for j, bid, e in got if e == "batch.completed"] == [(None, batch_id)]


def test_concurrent_last_jobs_emit_batch_completed_exactly_once(db_url: str) -> None:
    """Two workers end a batch's last two jobs at the same moment: exactly one batch.completed."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: the race needs PostgreSQL's row locks")
    batch_id, ids = _batch(db_url, 2, ["batch.completed"])
    attempts = [run(db_url, j) for j in ids]
    start = threading.Barrier(2)

    def finish(job_id: str, attempt: int) -> None:
        with get_sessionmaker(db_url)() as s:
            start.wait()
            assert jobstore.succeed(s, job_id, attempt, "r", {})
            s.commit()

    threads = [threading.Thread(target=finish, args=pair) for pair in zip(ids, attempts, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(e, bid) for _, bid, e in events(db_url)] == [("batch.completed", batch_id)]


def _one_event(url: str, make_job: MakeJob) -> str:
    job_id = make_job(webhook=HOOK, status=JobStatus.QUEUED)
    with get_sessionmaker(url)() as s:
        assert jobstore.request_cancel(s, "t1", job_id) is jobstore.CancelResult.CANCELED
        s.commit()
        return str(s.scalar(select(WebhookEvent.id).where(WebhookEvent.job_id == job_id)))


POLICY = webhook_outbox.RetryPolicy(base_s=10, max_s=40, window_s=100)


def test_outbox_due_lease_retry_and_window(db_url: str, make_job: MakeJob) -> None:
    event_id = _one_event(db_url, make_job)
    sessions = get_sessionmaker(db_url)
    now = utcnow()
    with sessions() as s:
        assert webhook_outbox.due(s, now, grace_s=30) == [event_id]
        assert webhook_outbox.due(s, now, grace_s=30) == []  # a message is on its way
        s.commit()
    with sessions() as s:
        first = webhook_outbox.claim(s, event_id, now, lease_s=60)
        assert first is not None and first.attempt == 1 and first.event == "completed"
        assert webhook_outbox.claim(s, event_id, now, lease_s=60) is None  # the lease is held
        failed = webhook_outbox.Outcome(500, 12.0, "HTTP 500")
        assert webhook_outbox.record(s, first, failed, POLICY, now=now, rng=random.Random(1)) == "pending"
        s.commit()
        next_at = s.scalar(select(WebhookEvent.next_attempt_at).where(WebhookEvent.id == event_id))
    assert next_at is not None
    wait = (next_at.replace(tzinfo=timezone.utc) - now).total_seconds()
    assert 5 <= wait <= 10  # half the backoff plus up to half of it
    with sessions() as s:
        assert webhook_outbox.claim(s, event_id, now, lease_s=60) is None  # not due yet
        assert webhook_outbox.due(s, now, grace_s=30) == []
        later = now + timedelta(seconds=11)
        assert webhook_outbox.due(s, later, grace_s=30) == [event_id]
        second = webhook_outbox.claim(s, event_id, later, lease_s=60)
        assert second is not None and second.attempt == 2
        ok = webhook_outbox.Outcome(204, 3.0, None)
        assert webhook_outbox.record(s, second, ok, POLICY, now=later) == "delivered"
        s.commit()
        attempts = s.execute(select(WebhookAttempt.attempt, WebhookAttempt.status_code)).all()
    assert sorted(tuple(a) for a in attempts) == [(1, 500), (2, 204)]
    with sessions() as s:  # settled: never taken again
        assert webhook_outbox.claim(s, event_id, now + timedelta(days=1), lease_s=60) is None
        assert webhook_outbox.prune(s, now + timedelta(days=1)) == 1
        s.commit()
        assert s.scalar(select(WebhookAttempt.id)) is None


def test_a_killed_attempt_is_taken_again_when_its_lease_ends(db_url: str, make_job: MakeJob) -> None:
    event_id = _one_event(db_url, make_job)
    now = utcnow()
    with get_sessionmaker(db_url)() as s:
        assert webhook_outbox.claim(s, event_id, now, lease_s=30) is not None  # then the sender dies
        s.commit()
        assert webhook_outbox.due(s, now + timedelta(seconds=10), grace_s=5) == []  # lease still live
        assert webhook_outbox.due(s, now + timedelta(seconds=31), grace_s=5) == [event_id]
        again = webhook_outbox.claim(s, event_id, now + timedelta(seconds=31), lease_s=30)
        assert again is not None and again.attempt == 2


def test_an_event_fails_when_its_retry_window_ends(db_url: str, make_job: MakeJob) -> None:
    event_id = _one_event(db_url, make_job)
    late = utcnow() + timedelta(seconds=95)  # the next attempt would fall after the 100 s window
    with get_sessionmaker(db_url)() as s:
        claimed = webhook_outbox.claim(s, event_id, late, lease_s=30)
        assert claimed is not None
        outcome = webhook_outbox.Outcome(None, 10_000.0, "timeout")
        assert webhook_outbox.record(s, claimed, outcome, POLICY, now=late) == "failed"


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    rng = random.Random(7)
    delays = [POLICY.delay(n, rng) for n in (1, 2, 3, 4, 5)]
    for delay, full in zip(delays, (10, 20, 40, 40, 40), strict=True):
        assert full / 2 <= delay <= full
    assert len({round(d, 3) for d in delays}) == len(delays)  # jittered


def test_signing_secret_made_once_and_rotation_keeps_the_previous_for_the_overlap(db_url: str) -> None:
    sessions = get_sessionmaker(db_url)
    with sessions() as s:
        first = webhook_secrets.get(s, "t1")
        s.commit()
    with sessions() as s:
        assert webhook_secrets.get(s, "t1") == first  # stable
        assert first.current.startswith("whsec_")
        now = datetime.now(timezone.utc)
        rotated = webhook_secrets.rotate(s, "t1", overlap_s=60, now=now)
        s.commit()
    assert rotated.current != first.current and rotated.previous == first.current
    assert rotated.signing(now) == [rotated.current, first.current]
    assert rotated.signing(now + timedelta(seconds=61)) == [rotated.current]


def test_event_ids_are_unique_and_standard_shaped() -> None:
    ids = {webhooks.new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("msg_") and len(i) == 36 for i in ids)


def test_an_attempt_that_outlived_its_lease_does_not_clear_the_newer_one(
    db_url: str, make_job: MakeJob
) -> None:
    event_id = _one_event(db_url, make_job)
    now = utcnow()
    with get_sessionmaker(db_url)() as s:
        old = webhook_outbox.claim(s, event_id, now, lease_s=30)
        new = webhook_outbox.claim(s, event_id, now + timedelta(seconds=31), lease_s=30)
        assert old is not None and new is not None
        late = webhook_outbox.Outcome(500, 40_000.0, "HTTP 500")
        assert webhook_outbox.record(s, old, late, POLICY, now=now + timedelta(seconds=40)) == "stale"
        s.commit()
        lease = s.scalar(select(WebhookEvent.lease_until).where(WebhookEvent.id == event_id))
        assert lease is not None  # the newer attempt still holds it: no third POST meanwhile
        assert webhook_outbox.due(s, now + timedelta(seconds=45), grace_s=5) == []
        assert s.scalar(select(WebhookAttempt.attempt)) == 1  # the late attempt is still on record


def test_events_a_publishing_session_wrote_are_not_published_again_by_the_pass(
    db_url: str, make_job: MakeJob
) -> None:
    sessions = get_sessionmaker(db_url)
    published: list[list[str]] = []
    maker = type(sessions)(bind=sessions.kw["bind"])  # a sessionmaker of its own for the listener
    webhooks.publish_after_commit(maker, published.append)
    job_id = make_job(webhook=HOOK)
    with maker() as s:
        assert jobstore.request_cancel(s, "t1", job_id) is jobstore.CancelResult.CANCELED
        s.commit()
    assert len(published) == 1 and len(published[0]) == 1
    now = utcnow()
    with sessions() as s:
        assert webhook_outbox.due(s, now, grace_s=30) == []  # on its way already
        assert webhook_outbox.due(s, now + timedelta(seconds=31), grace_s=30) == published[0]  # lost?


def test_concurrent_rotations_keep_both_secrets_real(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: the race needs PostgreSQL's row locks")
    sessions = get_sessionmaker(db_url)
    with sessions() as s:
        first = webhook_secrets.get(s, "t1").current
        s.commit()
    start = threading.Barrier(2)
    got: list[webhook_secrets.SigningSecrets] = []

    def rotate() -> None:
        with sessions() as s:
            start.wait()
            got.append(webhook_secrets.rotate(s, "t1", overlap_s=60))
            s.commit()

    threads = [threading.Thread(target=rotate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as s:
        stored = webhook_secrets.get(s, "t1")
    assert {stored.current, stored.previous} == {g.current for g in got}  # neither rotation lost
    assert first in {g.previous for g in got}
