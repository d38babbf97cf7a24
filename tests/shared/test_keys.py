"""API key lifecycle (create with expiry, list, revoke, rotate, last use) and the ``keys`` and
``tenants`` commands, against the API on SQLite."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from shared import tenants
from shared.cli import main
from shared.db import session_scope
from shared.errors import Conflict, NotFound
from shared.models import ApiKey, Tenant, utcnow
from shared.settings import Settings
from shared.tenants import aware
from tests.support.apps import Api, build_api


@pytest.fixture
def app(settings_factory: Callable[..., Settings]) -> Api:
    return build_api(settings_factory(key_rotate_overlap_s=3600))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _new_key(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    """(key, prefix) printed by ``keys create`` / ``keys rotate``."""
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert key.startswith("sq_")
    return key, key[: tenants.PREFIX_LEN]


def _get(api: Api, key: str) -> Any:
    return api.client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})


def _key_row(api: Api, prefix: str) -> ApiKey:
    with session_scope(api.settings.database_url) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        assert row is not None
        return row


def test_an_expiring_key(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    key, prefix = _new_key(capsys, "keys", "create", "--tenant", "dora", "--expires-in", "30")
    expires = aware(_key_row(app, prefix).expires_at or utcnow())
    assert abs(expires - (utcnow() + timedelta(days=30))) < timedelta(minutes=1)
    assert _get(app, key).status_code == 200
    with session_scope(app.settings.database_url) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(expires_at=utcnow()))
    r = _get(app, key)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "expired_api_key" and "expired at" in r.json()["error"]["message"]
    with pytest.raises(SystemExit) as refused:  # argparse refuses it
        main(["keys", "create", "--tenant", "dora", "--expires-in", "0"])
    assert refused.value.code == 2 and "expiry" in capsys.readouterr().err


def test_revoke(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    key, prefix = _new_key(capsys, "keys", "create", "--tenant", "erin")
    assert _get(app, key).status_code == 200
    code, out, _ = _cli(capsys, "keys", "revoke", prefix)
    assert code == 0 and f"key {prefix} of tenant erin revoked" in out
    r = _get(app, key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    code, _, err = _cli(capsys, "keys", "revoke", "sq_nothing")
    assert code == 1 and "no key has the prefix 'sq_nothing'" in err


def test_rotate_keeps_the_old_key_for_the_overlap(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    old, prefix = _new_key(capsys, "keys", "create", "--tenant", "fred")
    new, new_prefix = _new_key(capsys, "keys", "rotate", prefix)  # the setting: 3600 s
    assert new != old and new_prefix != prefix
    assert _get(app, old).status_code == 200 and _get(app, new).status_code == 200
    until = aware(_key_row(app, prefix).expires_at or utcnow())
    assert abs(until - (utcnow() + timedelta(seconds=3600))) < timedelta(minutes=1)
    assert _key_row(app, new_prefix).expires_at is None and _key_row(app, new_prefix).tenant_id == (
        _key_row(app, prefix).tenant_id
    )
    _new_key(capsys, "keys", "rotate", new_prefix, "--overlap", "0")
    assert _get(app, new).json()["error"]["code"] == "expired_api_key"  # at once
    code, _, err = _cli(capsys, "keys", "rotate", new_prefix)
    assert code == 1 and "expired" in err  # nothing to rotate any more


def test_last_used_is_written_at_most_once_a_minute(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    key, prefix = _new_key(capsys, "keys", "create", "--tenant", "gina")
    assert _key_row(app, prefix).last_used_at is None
    assert _get(app, key).status_code == 200
    first = _key_row(app, prefix).last_used_at
    assert first is not None
    assert _get(app, key).status_code == 200
    assert _key_row(app, prefix).last_used_at == first  # not written again within the minute
    with session_scope(app.settings.database_url) as session:
        earlier = aware(first) - timedelta(seconds=61)
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(last_used_at=earlier))
    assert _get(app, key).status_code == 200
    assert aware(_key_row(app, prefix).last_used_at or earlier) > aware(first)


def test_list_shows_no_secret(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    key, prefix = _new_key(capsys, "keys", "create", "--tenant", "hana", "--expires-in", "1")
    other, other_prefix = _new_key(capsys, "keys", "create", "--tenant", "ivan")
    _cli(capsys, "keys", "revoke", other_prefix)
    code, out, _ = _cli(capsys, "keys", "list")
    assert code == 0 and key not in out and other not in out and key[10:20] not in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines[prefix][1:3] == ["hana", "active"] and lines[other_prefix][1:3] == ["ivan", "revoked"]
    assert out.splitlines()[0].split()[:3] == ["PREFIX", "TENANT", "STATE"]
    code, out, _ = _cli(capsys, "keys", "list", "--tenant", "hana")
    assert prefix in out and other_prefix not in out
    assert _cli(capsys, "keys", "list", "--tenant", "nobody")[0] == 1


def test_an_ambiguous_prefix_changes_nothing(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    _, prefix = _new_key(capsys, "keys", "create", "--tenant", "jack")
    with session_scope(app.settings.database_url) as session:  # a legacy collision
        kim = tenants.get_or_create_tenant(session, "kim")
        session.add(ApiKey(tenant_id=kim.id, key_hash="f" * 64, prefix=prefix))
    for command in ("revoke", "rotate"):
        code, _, err = _cli(capsys, "keys", command, prefix)
        assert code == 1 and "2 keys have the prefix" in err and "--tenant" in err
    with session_scope(app.settings.database_url) as session:
        assert all(k.revoked_at is None and k.expires_at is None for k in session.scalars(select(ApiKey)))
        with pytest.raises(Conflict):
            tenants.find_key(session, prefix)
        with pytest.raises(NotFound):
            tenants.find_key(session, prefix, "alice")
    code, out, _ = _cli(capsys, "keys", "revoke", prefix, "--tenant", "kim")
    assert code == 0 and "of tenant kim revoked" in out
    with session_scope(app.settings.database_url) as session:
        rows = session.execute(
            select(Tenant.name, ApiKey.revoked_at).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        )
        revoked = {name: at is not None for name, at in rows if name in ("jack", "kim")}
    assert revoked == {"jack": False, "kim": True}


def test_a_new_key_never_reuses_a_prefix(app: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = app.key[3 : tenants.PREFIX_LEN]
    draws = iter([taken + "x" * 36, "Zfresh1" + "y" * 36])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    with session_scope(app.settings.database_url) as session:
        new = tenants.create_key(session, "lena")
    assert new.prefix == "sq_Zfresh1"


def _tenant(api: Api, name: str) -> Tenant:
    with session_scope(api.settings.database_url) as session:
        row = session.scalar(select(Tenant).where(Tenant.name == name))
        assert row is not None
        return row


def test_tenants_set_limits_and_show(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tenants", "set-limits", "alice", "--max-queued", "5", "--max-running", "2"]
    argv += ["--daily-budget-mpi", "100", "--rate-limit", "5/second;100/minute", "--weight", "3"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    t = _tenant(app, "alice")
    assert (t.max_queued, t.max_running, t.daily_budget_mpi, t.rate_limit, t.weight) == (
        5,
        2,
        100,
        "5/second;100/minute",
        3,
    )
    assert "5/second;100/minute (override)" in out and "used today        0 MPI" in out
    assert (
        _cli(capsys, "tenants", "set-limits", "alice", "--max-queued", "default", "--weight", "default")[0]
        == 0
    )
    t = _tenant(app, "alice")
    assert (t.max_queued, t.weight, t.max_running) == (None, 1, 2)
    code, out, _ = _cli(capsys, "tenants", "show", "alice")
    assert code == 0 and "max queued        2000 (setting); queued now 0" in out
    assert "daily budget      100 MPI (override)" in out and "100 left" in out
    assert _cli(capsys, "tenants", "set-limits", "alice", "--rate-limit", "off")[0] == 0
    assert _tenant(app, "alice").rate_limit == ""
    assert "rate limit        no limit (override)" in _cli(capsys, "tenants", "show", "alice")[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rate-limit", "lots"], "is not a rate limit"),
        (["--rate-limit", "5/fortnight"], "is not a rate limit"),
        (["--max-queued", "-1"], "integer >= 0"),
        (["--weight", "0"], "integer >= 1"),
        (["--daily-budget-mpi", "1e6"], "integer >= 0"),
        (["--max-queued", "3", "--weight", "x"], "integer >= 1"),  # all checked before any is set
    ],
)
def test_set_limits_refuses_bad_values(
    app: Api, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = _cli(capsys, "tenants", "set-limits", "alice", *argv)
    assert code == 1 and message in err
    t = _tenant(app, "alice")
    assert (t.max_queued, t.rate_limit, t.weight, t.daily_budget_mpi) == (None, None, 1, None)


def test_set_limits_needs_a_known_tenant_and_an_option(app: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "tenants", "set-limits", "nobody", "--weight", "2")
    assert code == 1 and "no tenant named 'nobody'" in err
    assert _cli(capsys, "tenants", "set-limits", "alice")[0] == 2
    assert _cli(capsys, "tenants", "show", "nobody")[0] == 1
