"""Idempotency keys on real databases: replay, conflicting reuse, races, expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import InvalidInput
from shared.idempotency import (
    RETENTION,
    StoredResponse,
    check_key,
    fingerprint,
    lookup,
    prune,
    remember,
)
from shared.models import IdempotencyKey, utcnow


def test_fingerprint_separates_parts() -> None:
    assert fingerprint([b"ab", b"c"]) != fingerprint([b"a", b"bc"])
    assert fingerprint(["x", b"y"]) == fingerprint([b"x", "y"])


def test_replay_conflict_and_tenant_scope(sessions: sessionmaker[Session]) -> None:
    first = StoredResponse(202, {"id": "job-1"})
    with sessions() as s:
        assert lookup(s, "t1", "k", "h1") is None
        remember(s, "t1", "k", "h1", first)
        s.commit()
    with sessions() as s:
        assert lookup(s, "t1", "k", "h1") == first
        with pytest.raises(InvalidInput) as err:
            lookup(s, "t1", "k", "h2")
        assert err.value.code == "idempotency_key_reused"
        assert lookup(s, "t2", "k", "h2") is None  # keys are per tenant


def test_concurrent_second_insert_loses(sessions: sessionmaker[Session]) -> None:
    with sessions() as a, sessions() as b:
        remember(a, "t1", "race", "h", StoredResponse(202, {"n": 1}))
        a.commit()
        remember(b, "t1", "race", "h", StoredResponse(202, {"n": 2}))
        with pytest.raises(IntegrityError):
            b.commit()
        b.rollback()
        assert lookup(b, "t1", "race", "h") == StoredResponse(202, {"n": 1})


def test_expired_keys_are_reusable_and_pruned(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        s.add(
            IdempotencyKey(
                tenant_id="t1",
                key="old",
                request_hash="h",
                status_code=202,
                response={},
                created_at=utcnow() - RETENTION - timedelta(hours=1),
            )
        )
        s.add(IdempotencyKey(tenant_id="t1", key="new", request_hash="h", status_code=202, response={}))
        s.commit()
    assert timedelta(hours=24) <= RETENTION
    with sessions() as s:
        assert lookup(s, "t1", "old", "other") is None  # expired: not a conflict
        s.commit()
        remember(s, "t1", "old", "other", StoredResponse(202, {}))
        s.commit()
    with sessions() as s:
        s.add(
            IdempotencyKey(
                tenant_id="t1",
                key="older",
                request_hash="h",
                status_code=202,
                response={},
                created_at=utcnow() - RETENTION - timedelta(hours=1),
            )
        )
        s.commit()
        assert prune(s) == 1
        s.commit()
        assert s.scalar(select(func.count()).select_from(IdempotencyKey)) == 2


@pytest.mark.parametrize("bad", ["", "   ", "x" * 256])
def test_bad_keys(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_key(bad)
