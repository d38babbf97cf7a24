"""api.webhook_sender against a real receiver on loopback: signed per Standard Webhooks (verified by
the receiver with the library), the body the job as GET shows it, the same id and bytes on every
retry after a 500 and a timeout, both secrets signing during a rotation, and a target refused at
delivery time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.webhook_breaker import FAILURES
from api.webhook_sender import Sender
from shared import jobstore, webhook_secrets
from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.models import Job, StoredImage, Tenant, WebhookAttempt, WebhookEvent
from shared.settings import Settings
from shared.storage import open_storage
from shared.webhook_guard import Target
from shared.webhook_http import Response
from tests.support.receiver import HANG, Receiver

IMAGE = "a" * 64


@pytest.fixture
def settings(settings_factory: Callable[..., Settings], sqlite_url: str) -> Settings:
    s = settings_factory(
        database_url=sqlite_url,
        webhook_allow_hosts="127.0.0.1",
        webhook_timeout_s=1.0,
        webhook_backoff_s=0.001,  # the next attempt is due at once
        webhook_backoff_max_s=0.001,
    )
    upgrade(s.database_url)
    with get_sessionmaker(s.database_url)() as session:
        session.add(Tenant(id="t1", name="t1"))
        session.add(StoredImage(id=IMAGE, format="PNG", width=8, height=8, bytes=1, storage_key="k"))
        session.commit()
    return s


@pytest.fixture
def receiver(settings: Settings) -> Iterator[Receiver]:
    def secret() -> str:
        with get_sessionmaker(settings.database_url)() as s:
            return webhook_secrets.get(s, "t1").current

    r = Receiver(secret).start()
    yield r
    r.stop()


def _sender(settings: Settings) -> Sender:
    return Sender(get_sessionmaker(settings.database_url), settings, open_storage(settings))


def _completed_event(settings: Settings, url: str, tenant: str = "t1") -> tuple[str, str]:
    with get_sessionmaker(settings.database_url)() as s:
        job = Job(tenant_id=tenant, content_image_id=IMAGE, style_image_ids=[IMAGE], webhook=url)
        s.add(job)
        s.flush()
        assert jobstore.request_cancel(s, tenant, job.id) is jobstore.CancelResult.CANCELED
        s.commit()
        event_id = s.scalar(select(WebhookEvent.id).where(WebhookEvent.job_id == job.id))
        return job.id, str(event_id)


def test_a_delivery_is_signed_and_carries_the_job(settings: Settings, receiver: Receiver) -> None:
    job_id, event_id = _completed_event(settings, receiver.url)
    assert _sender(settings).deliver(event_id) == "delivered"
    (got,) = receiver.deliveries
    assert got.verified and got.id == event_id and got.event == "completed"
    assert got.body["id"] == job_id and got.body["status"] == "canceled"
    assert _sender(settings).deliver(event_id) is None  # settled: never sent again


def test_retries_after_a_500_and_a_timeout_send_the_same_id_and_bytes(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.script = [500, HANG]
    _, event_id = _completed_event(settings, receiver.url)
    sender = _sender(settings)
    assert [sender.deliver(event_id) for _ in range(3)] == ["pending", "pending", "delivered"]
    assert len({d.id for d in receiver.deliveries}) == 1
    assert len({d.raw for d in receiver.deliveries}) == 1
    assert all(d.verified for d in receiver.deliveries)
    with get_sessionmaker(settings.database_url)() as s:
        rows = s.execute(
            select(WebhookAttempt.attempt, WebhookAttempt.status_code, WebhookAttempt.error).order_by(
                WebhookAttempt.attempt
            )
        ).all()
    assert [(a, code) for a, code, _ in rows] == [(1, 500), (2, None), (3, 200)]
    assert rows[1][2] is not None and "timeout" in rows[1][2]


def test_both_secrets_sign_during_a_rotation(settings: Settings, receiver: Receiver) -> None:
    sessions = get_sessionmaker(settings.database_url)
    with sessions() as s:
        old = webhook_secrets.get(s, "t1").current
        new = webhook_secrets.rotate(s, "t1", overlap_s=3600).current
        s.commit()
    _, event_id = _completed_event(settings, receiver.url)
    assert _sender(settings).deliver(event_id) == "delivered"
    (got,) = receiver.deliveries
    assert got.verified  # with the current secret
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # either verifies the same delivery
        Webhook(secret).verify(got.raw, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_secrets.make_secret()).verify(got.raw, got.headers)


def test_a_target_that_turned_private_is_refused_at_delivery(settings: Settings) -> None:
    _, event_id = _completed_event(settings, "https://hooks.example.com/in")

    def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.7"]  # the name now points inside the network (DNS rebinding)

    sender = _sender(settings)
    sender.resolve = resolve
    assert sender.deliver(event_id) == "pending"
    with get_sessionmaker(settings.database_url)() as s:
        error = s.scalar(select(WebhookAttempt.error))
    assert error is not None and error.startswith("refused:")


def test_a_dead_receiver_stops_taking_attempts_after_failures_in_a_row(settings: Settings) -> None:
    calls: list[str] = []

    def dead(target: Target, body: bytes, headers: dict[str, str], **_: object) -> Response:
        calls.append(headers["webhook-id"])
        return Response(None, 1000.0, "timeout", b"")

    sender = _sender(settings)
    sender.post = dead
    events = [_completed_event(settings, "http://127.0.0.1:9/hook")[1] for _ in range(FAILURES + 3)]
    for event_id in events:
        assert sender.deliver(event_id) == "pending"
    assert len(calls) == FAILURES  # the rest were not sent: no thread waited on them
    with get_sessionmaker(settings.database_url)() as s:
        errors = list(s.scalars(select(WebhookAttempt.error).order_by(WebhookAttempt.id)))
    assert errors[:FAILURES] == ["timeout"] * FAILURES
    assert all(e is not None and "circuit open" in e for e in errors[FAILURES:])


def test_one_tenants_slow_receiver_holds_at_most_its_share_of_the_sender(
    settings_factory: Callable[..., Settings], settings: Settings
) -> None:
    import threading

    with get_sessionmaker(settings.database_url)() as s:
        s.add(Tenant(id="t2", name="t2"))
        s.commit()
    settings = settings.model_copy(update={"webhook_concurrency": 2})  # a share: 1 in flight
    entered, release = threading.Event(), threading.Event()
    sent: list[str] = []

    def slow(target: Target, body: bytes, headers: dict[str, str], **_: object) -> Response:
        sent.append(headers["webhook-id"])
        if len(sent) == 1:
            entered.set()
            release.wait(30)
        return Response(200, 1.0, None, b"")

    sender = _sender(settings)
    sender.post = slow
    sender.shares.slow_s = 0.0  # the held attempt counts as slow at once (no waiting in the test)
    first, second = (_completed_event(settings, "http://127.0.0.1:9/a")[1] for _ in range(2))
    other = _completed_event(settings, "http://127.0.0.1:9/b", tenant="t2")[1]
    held = threading.Thread(target=sender.deliver, args=(first,))
    held.start()
    assert entered.wait(30)
    assert sender.deliver(second) == "deferred"  # t1's share is in flight: not sent, not counted
    assert sender.deliver(other) == "delivered"  # another tenant is not held up
    release.set()
    held.join(30)
    assert sent == [first, other]
    with get_sessionmaker(settings.database_url)() as s:
        attempts = s.scalar(select(WebhookEvent.attempts).where(WebhookEvent.id == second))
    assert attempts == 0


def test_an_event_that_cannot_be_prepared_is_recorded_and_frees_its_share(settings: Settings) -> None:
    sender = _sender(settings)

    def broken(session: object, claimed: object) -> str:
        raise RuntimeError("rendering failed")

    sender.render = broken  # type: ignore[method-assign]
    _, event_id = _completed_event(settings, "http://127.0.0.1:9/hook")
    assert sender.deliver(event_id) == "pending"  # recorded, retried with backoff, window-bounded
    with get_sessionmaker(settings.database_url)() as s:
        assert s.scalar(select(WebhookAttempt.error)) == "not sent: the event could not be prepared"
    sender.shares.slow_s = 0.0  # every attempt in flight counts: the share must be whole
    assert all(sender.shares.enter("t1") is not None for _ in range(sender.shares.cap))  # none leaked
