"""Signing in and out of the page, the session cookie and CSRF protection; the JSON API unchanged."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.web.auth import CSRF_COOKIE, SESSION_COOKIE, end_session, secret_of
from api.web.tokens import SessionToken, new_nonce, sign, verify
from shared.db import session_scope
from shared.models import WebSessionRevocation, utcnow
from shared.settings import Settings
from shared.tenants import aware, revoke_key
from tests.support.apps import Api, FakePublisher, build_api
from tests.web.webclient import TINY, Browser, browser, csrf_field, square


def cookies_set(answer: object) -> dict[str, str]:
    """Each Set-Cookie of an answer, by name: its whole header value."""
    out = {}
    for header in answer.headers.get_list("set-cookie"):  # type: ignore[attr-defined]
        name = SimpleCookie(header).keys()
        out[next(iter(name))] = header
    return out


def test_a_signed_out_browser_is_sent_to_the_sign_in_page(api: Api) -> None:
    answer = browser(api).get("/web/batches/123?x=1")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/web/login?next=%2Fweb%2Fbatches%2F123%3Fx%3D1"


def test_signing_in_sets_a_strict_httponly_session_cookie_without_the_key(api: Api) -> None:
    b = browser(api)
    page = b.get("/web/login")
    assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=strict" in page.headers["set-cookie"]
    answer = b.post(
        "/web/login", data={"api_key": api.key, "csrf_token": csrf_field(page.text), "next": "/web/submit"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/web/submit"
    session = cookies_set(answer)[SESSION_COOKIE]
    for flag in ("HttpOnly", "SameSite=strict", "Path=/web", "Max-Age=28800"):
        assert flag in session, session
    assert api.key not in session and api.key[3:20] not in session
    assert "alice" in b.get("/web/batches").text


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/x", "/v1/jobs", "/web\\x", "/web/\n"]
)
def test_sign_in_goes_back_to_this_page_only(api: Api, target: str) -> None:
    b = browser(api)
    token = csrf_field(b.get("/web/login").text)
    answer = b.post("/web/login", data={"api_key": api.key, "csrf_token": token, "next": target})
    assert answer.headers["location"] == "/web/batches"


def test_a_wrong_key_is_told_in_words_and_gets_no_session(api: Api) -> None:
    b = browser(api)
    token = csrf_field(b.get("/web/login").text)
    answer = b.post("/web/login", data={"api_key": "sq_wrong", "csrf_token": token})
    assert answer.status_code == 401
    assert "the API key is unknown or revoked" in answer.text
    assert SESSION_COOKIE not in cookies_set(answer)
    assert b.get("/web/batches").status_code == 303


def test_sign_in_needs_the_forms_token_and_this_site(api: Api) -> None:
    b = browser(api)
    token = csrf_field(b.get("/web/login").text)
    assert b.post("/web/login", data={"api_key": api.key}).status_code == 403
    assert b.post("/web/login", data={"api_key": api.key, "csrf_token": token[:-2] + "xx"}).status_code == 403
    stranger = browser(api)  # no sq_csrf cookie: another site's form, as SameSite=Strict leaves it
    assert stranger.post("/web/login", data={"api_key": api.key, "csrf_token": token}).status_code == 403
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        answer = b.post("/web/login", data={"api_key": api.key, "csrf_token": token}, headers=headers)
        assert answer.status_code == 403 and "from the stylequeue page itself" in answer.text
    assert b.get("/web/batches").status_code == 303  # none of them signed in


def test_every_form_needs_its_token(web: Browser, api: Api) -> None:
    batch = web.submit().json()
    job_id = batch["job_ids"][0]
    forms = [
        f"/web/jobs/{job_id}/cancel",
        f"/web/jobs/{job_id}/delete",
        f"/web/batches/{batch['id']}/cancel",
        f"/web/batches/{batch['id']}/delete",
        "/web/logout",
    ]
    for path in forms:
        assert web.post(path, data={"csrf_token": "forged"}).status_code == 403, path
        assert web.post(path).status_code in (403, 422), path
        other_site = web.post(path, data={"csrf_token": web.csrf()}, headers={"Sec-Fetch-Site": "cross-site"})
        assert other_site.status_code == 403, path
    assert web.get(f"/web/jobs/{job_id}").status_code == 200  # nothing was canceled, deleted or signed out
    assert "queued" in web.get(f"/web/jobs/{job_id}").text


def test_the_submit_needs_the_csrf_header_and_creates_nothing_without(web: Browser, api: Api) -> None:
    before = api.counts()
    files = [("content", ("c.png", square(1), "image/png")), ("style", ("s.png", square(2), "image/png"))]
    for headers in (
        {},
        {"X-CSRF-Token": "forged"},
        {"X-CSRF-Token": web.csrf(), "Sec-Fetch-Site": "same-site"},
    ):
        answer = web.post("/web/batches", files=files, headers=headers)
        assert answer.status_code == 403, answer.text
    assert (
        browser(api).post("/web/batches", files=files, headers={"X-CSRF-Token": web.csrf()}).status_code
        == 401
    )
    assert api.counts() == before


def test_the_json_api_ignores_the_session_cookie(web: Browser, api: Api) -> None:
    """Cookies never sign in to /v1 (they are not even sent there: Path=/web): no CSRF hole."""
    cookies = "; ".join(f"{c.name}={c.value}" for c in web.client.cookies.jar)
    plain = TestClient(api.client.app)
    files = [("content", ("c.png", square(1), "image/png")), ("style", ("s.png", square(2), "image/png"))]
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/batches"), ("POST", "/v1/images")):
        answer = plain.request(
            method,
            path,
            headers={"Cookie": cookies, "X-CSRF-Token": web.csrf()},
            files=files if method == "POST" else None,
        )
        assert answer.status_code == 401, (path, answer.text)


def test_a_repeated_submit_is_answered_with_the_first_batch(web: Browser, api: Api) -> None:
    first = web.submit(headers={"Idempotency-Key": "form-1"})
    assert first.status_code == 202, first.text
    again = web.submit(headers={"Idempotency-Key": "form-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert api.counts()["batches"] == 1 and len(api.publisher.published) == 4


def test_a_submit_error_is_the_apis_own_answer(web: Browser) -> None:
    answer = web.submit(params={**TINY, "size": 4096})
    assert answer.status_code == 422
    assert answer.json()["error"] == {
        "code": "size_too_large",
        "message": "size 4096 is above the maximum 2048",
    }


def test_revoking_the_key_ends_its_sessions(web: Browser, api: Api) -> None:
    assert web.get("/web/batches").status_code == 200
    with session_scope(api.settings.database_url) as session:
        revoke_key(session, api.key[:10])
    assert web.get("/web/batches").status_code == 303


def test_a_forged_or_expired_session_cookie_is_refused(api: Api, web: Browser) -> None:
    secret = secret_of(api.client.app)
    valid = web.client.cookies.get(SESSION_COOKIE)
    assert valid
    key_id, tenant_id = _ids_of(valid)
    expired = sign(secret, SessionToken(key_id, tenant_id, "sq_x", int(time.time()) - 1, "sid"))
    forged = sign(b"x" * 32, SessionToken(key_id, tenant_id, "sq_x", int(time.time()) + 99, "sid"))
    other = sign(secret, SessionToken(key_id, "another-tenant", "sq_x", int(time.time()) + 99, "sid"))
    for raw in (expired, forged, other, valid[:-3] + "abc"):
        b = browser(api)
        b.client.cookies.set(SESSION_COOKIE, raw, path="/web")
        assert b.get("/web/batches").status_code == 303


def _ids_of(raw: str) -> tuple[str, str]:
    import base64
    import json

    body = raw.split(".")[0]
    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return fields[1], fields[2]


def test_signing_out_deletes_the_cookies(web: Browser) -> None:
    answer = web.action("/web/logout")
    assert answer.status_code == 303 and answer.headers["location"] == "/web/login?notice=signed_out"
    deleted = cookies_set(answer)
    assert 'sq_session=""' in deleted[SESSION_COOKIE] and "Max-Age=0" in deleted[SESSION_COOKIE]
    assert "Max-Age=0" in deleted[CSRF_COOKIE]
    assert web.get("/web/batches").status_code == 303
    assert "You are signed out." in web.client.get("/web/login?notice=signed_out").text


@pytest.fixture(params=["sqlite", "postgresql"])
def both_dbs(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Api:
    """The app on SQLite, then on PostgreSQL (the sign-out tests write to the database)."""
    if request.param == "sqlite":
        return build_api(settings_factory())
    return build_api(settings_factory(database_url=request.getfixturevalue("pg_url")))


def _signed_in(api: Api) -> Browser:
    b = browser(api)
    b.sign_in()
    return b


def _with_cookie(api: Api, raw: str) -> Browser:
    """Another browser holding a copy of a session cookie (no sq_csrf: a page sets one)."""
    b = browser(api)
    b.client.cookies.set(SESSION_COOKIE, raw, path="/web")
    return b


def _revoked(api: Api) -> dict[str, datetime]:
    with session_scope(api.settings.database_url) as session:
        rows = session.execute(select(WebSessionRevocation.sid, WebSessionRevocation.expires_at)).all()
    return {sid: aware(ends) for sid, ends in rows}


def test_a_copied_cookie_is_refused_after_signing_out(both_dbs: Api) -> None:
    web = _signed_in(both_dbs)
    copied = web.client.cookies.get(SESSION_COOKIE)
    assert copied and _with_cookie(both_dbs, copied).get("/web/batches").status_code == 200
    assert web.action("/web/logout").status_code == 303
    thief = _with_cookie(both_dbs, copied)
    assert thief.get("/web/batches").status_code == 303  # sent to the sign-in page
    assert thief.get("/web/estimate?contents=1&styles=1").status_code == 401
    token = verify(secret_of(both_dbs.client.app), copied, time.time())
    assert token is not None
    assert _revoked(both_dbs) == {token.sid: datetime.fromtimestamp(token.expires, timezone.utc)}
    assert thief.post("/web/logout").status_code == 303  # no valid session: records nothing more
    assert len(_revoked(both_dbs)) == 1


def test_signing_out_deletes_revocations_that_have_expired(both_dbs: Api) -> None:
    old, recent = new_nonce(), new_nonce()
    with session_scope(both_dbs.settings.database_url) as session:
        session.add(WebSessionRevocation(sid=old, expires_at=utcnow() - timedelta(seconds=1)))
        session.add(WebSessionRevocation(sid=recent, expires_at=utcnow() + timedelta(hours=1)))
    web = _signed_in(both_dbs)
    assert web.action("/web/logout").status_code == 303
    left = _revoked(both_dbs)
    assert old not in left and recent in left and len(left) == 2


def test_signing_out_twice_is_recorded_once(both_dbs: Api) -> None:
    sid, ends = new_nonce(), int(time.time()) + 60
    for _ in range(2):
        with session_scope(both_dbs.settings.database_url) as session:
            end_session(session, sid, ends)
    assert _revoked(both_dbs) == {sid: datetime.fromtimestamp(ends, timezone.utc)}


def test_the_keys_other_sessions_go_on_after_one_signs_out(both_dbs: Api) -> None:
    laptop, phone = _signed_in(both_dbs), _signed_in(both_dbs)
    assert laptop.client.cookies.get(SESSION_COOKIE) != phone.client.cookies.get(SESSION_COOKIE)
    assert laptop.action("/web/logout").status_code == 303
    assert laptop.get("/web/batches").status_code == 303
    assert phone.get("/web/batches").status_code == 200
    assert phone.submit().status_code == 202  # its forms and submit work too


def test_pages_forbid_framing_and_other_origins(web: Browser) -> None:
    answer = web.get("/web/batches")
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"
    assert not re.search(r"https?://", re.sub(r'href="/[^"]*"', "", answer.text))  # nothing from elsewhere


def test_auth_off_opens_the_page_for_the_local_tenant_only(settings_factory: Callable[..., Settings]) -> None:
    app = create_app(settings_factory(auth="off"), publisher=FakePublisher())
    api = Api(TestClient(app), app.state.settings, FakePublisher(), "", app.state.storage)
    local = browser(api, client=("127.0.0.1", 5000))
    page = local.get("/web/batches")
    assert page.status_code == 200 and "local" in page.text and "Sign out" not in page.text
    assert local.get("/web/login").status_code == 303  # nothing to sign in to
    created = local.submit()
    assert created.status_code == 202, created.text
    assert local.post("/web/batches", headers={"X-CSRF-Token": "forged"}).status_code == 403  # still needed
    job_id = created.json()["job_ids"][0]
    assert local.post(f"/web/jobs/{job_id}/cancel", data={"csrf_token": "forged"}).status_code == 403
    remote = browser(api, client=("10.1.2.3", 5000)).get("/web/batches")
    assert remote.status_code == 401 and "loopback clients only" in remote.text
