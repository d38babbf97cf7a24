"""Webhooks through the API: targets checked at submission (a refused one creates nothing), the
event filter, the signing secret (read, rotate) and a job's delivery attempts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Batch, Job, WebhookAttempt, WebhookEvent, utcnow
from shared.settings import Settings
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes

REFUSED = [
    "http://hooks.example.com/in",  # plain http
    "https://127.0.0.1/in",
    "https://10.1.2.3/in",
    "https://169.254.169.254/latest/meta-data",
    "https://[::1]/in",
    "https://[::ffff:192.168.0.1]/in",
    "https://2130706433/in",  # 127.0.0.1 in decimal
    "https://0177.0.0.1/in",  # in octal
    "https://localhost/in",
    "https://user:pw@hooks.example.com/in",
    "ftp://hooks.example.com/in",
]


def _error(r: object) -> str:
    body = r.json()  # type: ignore[attr-defined]
    return str(body["error"]["code"])


@pytest.mark.parametrize("url", REFUSED)
def test_a_private_or_plain_target_is_refused_and_creates_nothing(api: Api, url: str) -> None:
    before = api.counts()
    r = submit(api.client, content=image_bytes(), styles=[image_bytes()], data={"webhook": url})
    assert r.status_code == 422, r.text
    assert _error(r) == "webhook_forbidden"
    assert api.counts() == before


def test_a_batch_with_a_refused_target_creates_nothing(api: Api) -> None:
    c = upload(api.client, image_bytes()).json()["id"]
    before = api.counts()
    r = api.client.post(
        "/v1/batches", json={"contents": [c], "styles": [c], "webhook": "https://192.168.1.10/hook"}
    )
    assert r.status_code == 422 and _error(r) == "webhook_forbidden"
    assert api.counts() == before


@pytest.fixture
def loopback_api(settings_factory: Callable[..., Settings]) -> Api:
    return build_api(settings_factory(webhook_allow_hosts="127.0.0.0/8, ::1"))


def test_an_allow_listed_target_is_stored_with_its_filter(loopback_api: Api) -> None:
    hook = "http://127.0.0.1:8123/in"
    r = submit(
        loopback_api.client,
        content=image_bytes(),
        styles=[image_bytes()],
        data={"webhook": hook, "webhook_events_filter": "completed, start"},
    )
    assert r.status_code == 202, r.text
    with session_scope(loopback_api.settings.database_url) as s:
        job = s.get(Job, r.json()["id"])
        assert job is not None and job.webhook == hook and job.webhook_events == ["start", "completed"]


def test_a_batch_webhook_goes_on_the_batch_and_every_job(loopback_api: Api) -> None:
    c = upload(loopback_api.client, image_bytes()).json()["id"]
    r = loopback_api.client.post(
        "/v1/batches",
        json={
            "contents": [c],
            "styles": [c, c],
            "webhook": "http://127.0.0.1:8123/in",
            "webhook_events_filter": ["batch.completed"],
        },
    )
    assert r.status_code == 202, r.text
    with session_scope(loopback_api.settings.database_url) as s:
        batch = s.get(Batch, r.json()["id"])
        assert batch is not None and batch.webhook_events == ["batch.completed"]
        jobs = s.scalars(select(Job).where(Job.batch_id == batch.id)).all()
        assert len(jobs) == 2 and all(j.webhook == batch.webhook for j in jobs)


@pytest.mark.parametrize(
    "fields",
    [
        {"webhook": "http://127.0.0.1:8123/in", "webhook_events_filter": "finished"},
        {"webhook": "http://127.0.0.1:8123/in", "webhook_events_filter": "batch.completed"},  # a job
        {"webhook": "http://127.0.0.1:8123/in", "webhook_events_filter": '["start", 3]'},
        {"webhook_events_filter": "completed"},  # no target
    ],
)
def test_a_bad_event_filter_is_refused(loopback_api: Api, fields: dict[str, str]) -> None:
    before = loopback_api.counts()
    r = submit(loopback_api.client, content=image_bytes(), styles=[image_bytes()], data=fields)
    assert r.status_code == 422, r.text
    assert _error(r) == "invalid_webhook_events"
    assert loopback_api.counts() == before


def test_the_secret_is_stable_per_tenant_and_rotates_with_an_overlap(api: Api) -> None:
    first = api.client.get("/v1/webhooks/secret").json()
    assert first["secret"].startswith("whsec_") and first["previous_valid_until"] is None
    assert api.client.get("/v1/webhooks/secret").json() == first
    other = api.as_tenant("bob").get("/v1/webhooks/secret").json()
    assert other["secret"] != first["secret"]
    rotated = api.client.post("/v1/webhooks/secret/rotate").json()
    assert rotated["secret"] not in (first["secret"], other["secret"])
    assert rotated["previous_valid_until"] is not None
    assert api.client.get("/v1/webhooks/secret").json()["secret"] == rotated["secret"]


def test_a_jobs_attempts_are_listed_to_its_tenant_only(api: Api) -> None:
    job_id = submit(api.client, content=image_bytes(), styles=[image_bytes()]).json()["id"]
    with session_scope(api.settings.database_url) as s:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
        s.add(
            WebhookEvent(
                id="msg_" + "a" * 32,
                tenant_id=tenant_id,
                job_id=job_id,
                event="completed",
                url="https://hooks.example.com/in",
                state="pending",
                attempts=2,
                next_attempt_at=utcnow(),
            )
        )
        s.flush()
        for n, code, error in ((1, None, "timeout"), (2, 500, "HTTP 500")):
            s.add(
                WebhookAttempt(
                    event_id="msg_" + "a" * 32,
                    job_id=job_id,
                    attempt=n,
                    status_code=code,
                    latency_ms=12.5,
                    error=error,
                )
            )
    items = api.client.get(f"/v1/jobs/{job_id}/webhooks").json()["items"]
    assert [(i["attempt"], i["status_code"], i["error"]) for i in items] == [
        (2, 500, "HTTP 500"),
        (1, None, "timeout"),
    ]
    assert {i["event_id"] for i in items} == {"msg_" + "a" * 32}
    assert api.as_tenant("mallory").get(f"/v1/jobs/{job_id}/webhooks").status_code == 404


def test_a_tenants_slow_webhook_lookups_never_hold_up_other_tenants(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory's webhook hosts resolve slowly: she gets her lookups' share (then 429), and Bob's
    submission, which needs no lookup, is answered meanwhile (no image-decoding thread is held)."""
    import threading

    from api import webhook_input

    api = build_api(settings_factory(decode_threads=1))
    started, release = threading.Semaphore(0), threading.Event()
    gave_up: list[str] = []  # a lookup that waited 20 s: Bob's answer was held behind it

    def slow(host: str, port: int) -> list[str]:
        started.release()
        if not release.wait(20):
            gave_up.append(host)
        return ["93.184.216.34"]

    monkeypatch.setattr(webhook_input, "RESOLVER", slow)
    mallory = api.as_tenant("mallory")
    answers: list[int] = []

    def submit_slow(i: int) -> None:
        hook = {"webhook": f"https://h{i}.slow.example/x"}
        answers.append(submit(mallory, content=image_bytes(), styles=[image_bytes()], data=hook).status_code)

    threads = [
        threading.Thread(target=submit_slow, args=(i,)) for i in range(webhook_input.LOOKUPS_PER_TENANT)
    ]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert started.acquire(timeout=30)  # both of her lookups are under way
        third = submit(
            mallory, content=image_bytes(), styles=[image_bytes()], data={"webhook": "https://h9.x.example/"}
        )
        assert third.status_code == 429 and _error(third) == "webhook_lookups_busy"
        bob = submit(api.client, content=image_bytes(), styles=[image_bytes()])
        assert bob.status_code == 202, bob.text
        assert not gave_up  # answered while her lookups still hung
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert answers == [202, 202]
