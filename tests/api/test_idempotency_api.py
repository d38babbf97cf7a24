"""Idempotency-Key on POST /v1/jobs and /v1/batches, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import IdempotencyKey
from tests.support.apps import Api, submit, upload
from tests.support.images import image_bytes

KEY = {"Idempotency-Key": "order-42"}


def _post_job(
    api: Api, content: bytes, style: bytes, key: dict[str, str] | None = None, params: str = '{"size": 128}'
) -> Any:
    return api.client.post(
        "/v1/jobs",
        files=[("content", ("c.png", content, "image/png")), ("style", ("s.png", style, "image/png"))],
        data={"params": params},
        headers=key or {},
    )


def _keys(api: Api) -> int:
    with session_scope(api.settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(IdempotencyKey)) or 0


def test_replay_returns_the_first_response_and_creates_nothing(any_api: Api) -> None:
    c, s = image_bytes(), image_bytes()
    first = _post_job(any_api, c, s, KEY)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    before, published = any_api.counts(), list(any_api.publisher.published)
    for _ in range(2):
        again = _post_job(any_api, c, s, KEY)
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
    assert any_api.counts() == before and before["jobs"] == 1
    assert any_api.publisher.published == published == [first.json()["id"]]
    assert _keys(any_api) == 1


def test_same_key_other_body_is_422_and_creates_nothing(any_api: Api) -> None:
    c, s = image_bytes(), image_bytes()
    assert _post_job(any_api, c, s, KEY).status_code == 202
    before = any_api.counts()
    for other in (
        _post_job(any_api, c, image_bytes(), KEY),  # another file
        _post_job(any_api, c, s, KEY, params='{"size": 256}'),  # another field value
        any_api.client.post(
            "/v1/batches", json={"contents": ["x"], "styles": ["y"]}, headers=KEY
        ),  # another endpoint
    ):
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert any_api.counts() == before


def test_keys_are_per_tenant(any_api: Api) -> None:
    c, s = image_bytes(), image_bytes()
    mine = _post_job(any_api, c, s, KEY)
    bob = any_api.as_tenant("bob")
    theirs = bob.post(
        "/v1/jobs",
        headers=KEY,
        data={"params": "{}"},
        files=[("content", ("c.png", image_bytes(), "image/png")), ("style", ("s.png", s, "image/png"))],
    )
    assert mine.status_code == theirs.status_code == 202, theirs.text
    assert mine.json()["id"] != theirs.json()["id"]
    assert "idempotent-replayed" not in theirs.headers
    assert any_api.counts()["jobs"] == 2 and _keys(any_api) == 2


def test_no_key_creates_a_job_per_request(any_api: Api) -> None:
    c, s = image_bytes(), image_bytes()
    ids = {submit(any_api.client, content=c, styles=[s]).json()["id"] for _ in range(2)}
    assert len(ids) == 2 and any_api.counts()["jobs"] == 2 and _keys(any_api) == 0


@pytest.mark.parametrize("bad", ["", "x" * 256])
def test_invalid_key_is_400(api: Api, bad: str) -> None:
    r = _post_job(api, image_bytes(), image_bytes(), {"Idempotency-Key": bad})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
    assert api.counts()["jobs"] == 0


def _run_at_once(n: int, call: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = call()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_duplicates_create_one_job(any_api: Api) -> None:
    c, s = image_bytes(), image_bytes()
    answers = _run_at_once(8, lambda: _post_job(any_api, c, s, KEY))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.text for a in answers}) == 1  # identical bodies, one job id
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7
    assert any_api.counts()["jobs"] == 1
    assert any_api.publisher.published == [answers[0].json()["id"]]


def test_losing_the_race_rolls_back_and_replays_the_winner(
    any_api: Api,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both requests pass the early lookup (as under a real race); the second's flush hits the
    unique key and everything it did is rolled back."""
    monkeypatch.setattr("api.idempotency.find_stored", lambda *a, **k: None)
    c, s = image_bytes(), image_bytes()
    first = _post_job(any_api, c, s, KEY)
    second = _post_job(any_api, c, s, KEY)
    assert second.status_code == 202 and second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert any_api.counts()["jobs"] == 1 and len(any_api.publisher.published) == 1


def test_batch_replay_json_and_multipart(any_api: Api) -> None:
    ids = [upload(any_api.client, image_bytes()).json()["id"] for _ in range(3)]
    body = {"contents": ids[:2], "styles": ids[2:], "params": {"size": 128, "iterations": 10}}
    first = any_api.client.post("/v1/batches", json=body, headers=KEY)
    assert first.status_code == 202, first.text
    reordered = {
        "params": {"iterations": 10, "size": 128},
        "styles": ids[2:],
        "contents": ids[:2],
    }  # the same JSON, keys in another order
    again = any_api.client.post("/v1/batches", json=reordered, headers=KEY)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert any_api.counts()["jobs"] == 2 and any_api.counts()["batches"] == 1

    files = [("content", ("c.png", image_bytes())), ("style", ("s.png", image_bytes()))]
    key = {"Idempotency-Key": "batch-form"}
    one = any_api.client.post("/v1/batches", files=files, headers=key)
    two = any_api.client.post("/v1/batches", files=files, headers=key)
    assert one.status_code == two.status_code == 202 and one.json() == two.json()
    assert any_api.counts()["batches"] == 2 and any_api.counts()["jobs"] == 3


def test_commit_lost_in_flight_is_undone(
    any_api: Api,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The COMMIT reaches the database but its answer is lost: the client gets 503, and the API
    deletes what was committed, so a retry with the same key creates the job afresh."""
    from shared import idempotency

    real_commit, real_remember = Session.commit, idempotency.remember

    def remember(session: Session, *args: Any) -> None:
        session.info["fail_after_commit"] = True  # only the submission's own transaction
        real_remember(session, *args)

    def flaky_commit(self: Session) -> None:
        real_commit(self)
        if self.info.pop("fail_after_commit", False):
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    c, s = image_bytes(), image_bytes()
    monkeypatch.setattr(Session, "commit", flaky_commit)
    monkeypatch.setattr("api.idempotency.remember", remember)
    lost = _post_job(any_api, c, s, KEY)
    monkeypatch.setattr(Session, "commit", real_commit)
    assert lost.status_code == 503 and lost.headers["retry-after"]
    assert lost.json()["error"]["code"] == "database_unavailable"
    indoubt = any_api.client.app.state.indoubt  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while indoubt.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert indoubt.pending() == 0
    assert "event=in_doubt_resolved committed=True deleted=1" in caplog.text
    assert any_api.counts()["jobs"] == 0 and _keys(any_api) == 0 and not any_api.publisher.published
    retry = _post_job(any_api, c, s, KEY)
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers
    assert any_api.counts()["jobs"] == 1


def test_an_expired_key_survives_a_rejected_request_and_is_replaced_by_a_new_job(any_api: Api) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from shared.idempotency import RETENTION
    from shared.models import utcnow

    assert _post_job(any_api, image_bytes(), image_bytes(), KEY).status_code == 202
    with session_scope(any_api.settings.database_url) as session:
        session.execute(update(IdempotencyKey).values(created_at=utcnow() - RETENTION - timedelta(hours=1)))
    before = any_api.counts()
    rejected = _post_job(any_api, image_bytes(), image_bytes(), KEY, params='{"size": 1}')
    assert rejected.status_code == 422 and _keys(any_api) == 1 and any_api.counts() == before
    fresh = _post_job(any_api, image_bytes(), image_bytes(), KEY)
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    assert _keys(any_api) == 1 and any_api.counts()["jobs"] == before["jobs"] + 1
