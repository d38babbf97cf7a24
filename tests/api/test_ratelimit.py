"""Rate limits per API key (429 ``rate_limited``, Retry-After, RateLimit-* fields), per tenant
override, Redis storage, failing open, and the per-address gate on failed authentications."""

from __future__ import annotations

import inspect
import logging
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update

from api.deps import current_tenant
from api.ratelimit import RateLimiter, storage_uri
from shared.db import get_engine, session_scope
from shared.models import Job, Tenant
from shared.settings import Settings
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes


def _limited(settings_factory: Callable[..., Settings], limit: str = "3/minute", **more: Any) -> Api:
    return build_api(settings_factory(rate_limit=limit, **more))


def _assert_refused(r: Any, limit: int, window_s: int) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited" and "retry in" in r.json()["error"]["message"]
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= window_s
    assert r.headers["RateLimit-Limit"] == str(limit)
    assert r.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(r.headers["RateLimit-Reset"]) <= window_s


def _set_rate_limit(api: Api, tenant: str, value: str | None) -> None:
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Tenant).where(Tenant.name == tenant).values(rate_limit=value))


def test_the_fourth_request_gets_429_with_headers(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory)
    for left in (2, 1, 0):
        r = api.client.get("/v1/jobs")
        assert r.status_code == 200, r.text
        assert r.headers["RateLimit-Limit"] == "3" and r.headers["RateLimit-Remaining"] == str(left)
        assert r.headers["RateLimit-Policy"] == "3;w=60"
        assert 1 <= int(r.headers["RateLimit-Reset"]) <= 60
    _assert_refused(api.client.get("/v1/jobs"), 3, 60)
    _assert_refused(api.client.get("/v1/jobs/x"), 3, 60)  # every authenticated route


def test_a_refused_submission_creates_nothing(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory)
    image_id = upload(api.client, image_bytes()).json()["id"]
    api.client.get("/v1/jobs")
    api.client.get("/v1/jobs")
    before = api.counts()
    r = api.client.post("/v1/batches", json={"contents": [image_id], "styles": [image_id]})
    _assert_refused(r, 3, 60)
    r = api.client.post("/v1/jobs", files={"content": ("c.png", image_bytes(), "image/png")})
    _assert_refused(r, 3, 60)
    assert api.counts() == before


def test_several_policies_report_the_nearest_to_exhaustion(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory, "2/second;5/minute")
    r = api.client.get("/v1/jobs")
    assert r.headers["RateLimit-Policy"] == "2;w=1, 5;w=60"
    assert (r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"]) == ("2", "1")


def test_every_answer_to_a_key_carries_the_headers(settings_factory: Callable[..., Settings]) -> None:
    """Submissions (a Response built by the route), streamed downloads and errors, not only GETs of
    models: each counts, and each says what is left."""
    api = _limited(settings_factory, "50/minute")
    content = upload(api.client, image_bytes()).json()["id"]
    answers = [
        submit(api.client, content=image_bytes(), styles=[image_bytes()]),  # 202, multipart
        api.client.post("/v1/batches", json={"contents": [content], "styles": [content]}),  # 202
        api.client.get("/v1/jobs/nope"),  # 404
        api.client.post("/v1/jobs", json={"content": content}),  # 400: not multipart
    ]
    job_id = answers[0].json()["id"]
    api.storage.put_bytes(f"jobs/{job_id}/result.png", b"\x89PNG-result")
    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="succeeded", result_key=f"jobs/{job_id}/result.png")
        )
    answers.append(api.client.get(f"/v1/jobs/{job_id}/result"))  # streamed from storage
    assert [r.status_code for r in answers] == [202, 202, 404, 400, 200], [r.text for r in answers]
    remaining = [int(r.headers["RateLimit-Remaining"]) for r in answers]
    assert remaining == [48 - i for i in range(5)], remaining  # the upload took the first request
    assert all(r.headers["RateLimit-Policy"] == "50;w=60" for r in answers)
    assert all(len(r.headers.get_list("RateLimit-Limit")) == 1 for r in answers)


def test_no_limit_no_headers(api: Api) -> None:
    r = api.client.get("/v1/jobs")
    assert r.status_code == 200 and "RateLimit-Limit" not in r.headers


def test_tenants_and_keys_have_separate_buckets(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory)
    for _ in range(3):
        assert api.client.get("/v1/jobs").status_code == 200
    assert api.client.get("/v1/jobs").status_code == 429
    bob = api.as_tenant("bob")
    assert [bob.get("/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]
    alice_again = api.as_tenant("alice")  # a second key of the same tenant
    assert alice_again.get("/v1/jobs").status_code == 200


def test_the_tenant_override_applies(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory)
    bob, carol = api.as_tenant("bob"), api.as_tenant("carol")
    _set_rate_limit(api, "alice", "1/minute")
    _set_rate_limit(api, "bob", "")  # `tenants set-limits bob --rate-limit off`
    r = api.client.get("/v1/jobs")
    assert r.status_code == 200 and r.headers["RateLimit-Policy"] == "1;w=60"
    _assert_refused(api.client.get("/v1/jobs"), 1, 60)
    assert all(bob.get("/v1/jobs").status_code == 200 for _ in range(6))
    assert "RateLimit-Limit" not in bob.get("/v1/jobs").headers
    assert [carol.get("/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]  # the setting


def test_an_invalid_override_falls_back_to_the_setting(settings_factory: Callable[..., Settings]) -> None:
    api = _limited(settings_factory)
    _set_rate_limit(api, "alice", "lots")  # only possible in SQL: set-limits validates
    assert [api.client.get("/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own in Redis, deleted afterwards."""
    import redis

    prefix = f"sq-test-rl-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_storage_is_shared_by_api_processes(
    settings_factory: Callable[..., Settings], redis_url: str, redis_prefix: str
) -> None:
    import redis

    api = _limited(settings_factory, broker_url=redis_url)
    assert storage_uri(api.settings) == redis_url  # the broker's Redis by default
    first = RateLimiter(redis_url, "3/minute", key_prefix=redis_prefix)
    second = RateLimiter(redis_url, "3/minute", key_prefix=redis_prefix)  # another API process
    api.client.app.state.rate_limiter = first  # type: ignore[attr-defined]
    assert [api.client.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
    api.client.app.state.rate_limiter = second  # type: ignore[attr-defined]
    assert api.client.get("/v1/jobs").headers["RateLimit-Remaining"] == "0"
    _assert_refused(api.client.get("/v1/jobs"), 3, 60)
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(f"{redis_prefix}:*")), "the counters live in Redis"
    client.close()


def test_the_configured_redis_storage_is_used(
    settings_factory: Callable[..., Settings], redis_url: str
) -> None:
    api = _limited(settings_factory, rate_limit_storage=redis_url)  # redis_url's DB is flushed per test
    assert [api.client.get("/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]
    limiter = api.client.app.state.rate_limiter  # type: ignore[attr-defined]
    assert limiter.scheme == "redis"


def test_an_unreachable_storage_fails_open(
    settings_factory: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    api = _limited(settings_factory, rate_limit_storage="redis://127.0.0.1:1/0")  # nothing listens
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        codes = [api.client.get("/v1/jobs").status_code for _ in range(5)]
    assert codes == [200] * 5
    warnings = [r for r in caplog.records if "rate_limit_storage_unreachable" in r.getMessage()]
    assert len(warnings) == 1, "one warning per outage back-off, not one per request"


class _Queries:
    """Counts the statements a database runs (to prove a request was answered before it)."""

    def __init__(self, url: str) -> None:
        self.engine = get_engine(url)
        self.statements: list[str] = []
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def test_failed_authentications_are_limited_per_address_before_the_database(
    settings_factory: Callable[..., Settings],
) -> None:
    api = _limited(settings_factory, "")
    limiter = RateLimiter("memory://", "", auth_failures="3/minute")
    api.client.app.state.rate_limiter = limiter  # type: ignore[attr-defined]
    assert api.client.get("/v1/jobs").status_code == 200  # alice's key: known to this process
    stranger = TestClient(api.client.app)
    for _ in range(3):
        r = stranger.get("/v1/jobs", headers={"Authorization": f"Bearer sq_{secrets.token_urlsafe(32)}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    queries = _Queries(api.settings.database_url)
    try:
        r = stranger.get("/v1/jobs", headers={"Authorization": f"Bearer sq_{secrets.token_urlsafe(32)}"})
    finally:
        queries.close()
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60 and r.headers["RateLimit-Policy"] == "3;w=60"
    assert not [s for s in queries.statements if "api_keys" in s], "refused before the key lookup"
    assert stranger.get("/v1/jobs").json()["error"]["code"] == "missing_api_key"  # no key: no query
    assert api.client.get("/v1/jobs").status_code == 200  # a known key from the same address passes
    bob = api.as_tenant("bob")  # a valid key this process has not seen yet: behind the gate too
    assert bob.get("/v1/jobs").status_code == 429


def test_the_default_failure_gate_lets_a_few_mistakes_through(api: Api) -> None:
    stranger = TestClient(api.client.app)
    codes = [
        stranger.get("/v1/jobs", headers={"Authorization": "Bearer sq_wrong"}).status_code for _ in range(5)
    ]
    assert codes == [401] * 5


def test_the_limiter_runs_in_the_threadpool() -> None:
    # current_tenant calls the database and Redis (blocking I/O): a sync dependency runs in the
    # threadpool; an async one would block the event loop.
    assert not inspect.iscoroutinefunction(current_tenant)


def test_a_malformed_rate_limit_setting_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from shared.settings import Settings

    with pytest.raises(ValidationError, match="is not a rate limit"):
        Settings(rate_limit="20/fortnight")
    assert Settings(rate_limit="").rate_limit == ""
