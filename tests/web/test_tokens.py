"""The page's signed session token, its CSRF token and the web secret (api/web/tokens.py)."""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from api.web import tokens
from api.web.tokens import SessionToken, csrf_matches, csrf_token, load_secret, new_nonce, sign, verify
from shared.settings import Settings

SECRET = b"s" * 32
TOKEN = SessionToken("key-row-id", "tenant-id", "sq_abcdefg", 2_000_000_000, new_nonce())


def test_a_signed_token_verifies_until_it_expires() -> None:
    raw = sign(SECRET, TOKEN)
    assert verify(SECRET, raw, now=1_000_000_000) == TOKEN
    assert verify(SECRET, raw, now=2_000_000_000) is None  # expired
    assert verify(b"o" * 32, raw, now=1_000_000_000) is None  # another secret


def test_a_changed_token_is_refused() -> None:
    body, mac = sign(SECRET, TOKEN).split(".")
    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    fields[2] = "another-tenant"
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    assert verify(SECRET, f"{forged}.{mac}", now=0) is None
    assert verify(SECRET, f"{body}.{mac[:-2]}AA", now=0) is None
    for junk in ("", ".", "a.b.c", "x" * 700, f"{body}.", f".{mac}", "%%%.%%%", None):
        assert verify(SECRET, junk, now=0) is None, junk


def test_the_csrf_token_is_bound_to_the_nonce_and_the_session() -> None:
    nonce = new_nonce()
    token = csrf_token(SECRET, nonce, "sid")
    assert csrf_matches(SECRET, nonce, "sid", token)
    assert not csrf_matches(SECRET, new_nonce(), "sid", token)  # another browser
    assert not csrf_matches(SECRET, nonce, "other-sid", token)  # another session
    assert not csrf_matches(SECRET, nonce, "", token)  # signed out (the sign-in form's token)
    assert not csrf_matches(b"o" * 32, nonce, "sid", token)
    for given in (None, "", token[:-1], "x" * 200):
        assert not csrf_matches(SECRET, nonce, "sid", given)
    assert not csrf_matches(SECRET, None, "sid", token)  # no cookie
    assert not csrf_matches(SECRET, "short", "sid", csrf_token(SECRET, "short", "sid"))  # not our nonce


def test_the_secret_is_made_once_and_kept_private(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(data_dir=tmp_path / "data")
    first = load_secret(settings)
    path = tmp_path / "data" / tokens.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(settings) == first  # the next process reads the same one
    assert load_secret(settings_factory(data_dir=tmp_path / "data", web_secret="x" * 40)) != first


def test_an_empty_secret_file_is_not_used(
    settings_factory: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / tokens.SECRET_FILE).write_text("")
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    with pytest.raises(RuntimeError, match="holds no secret"):
        load_secret(settings_factory(data_dir=tmp_path / "data"))
