"""Who is looking at the page, and the checks of every form it posts.

* **Sign-in** (``sign_in``): the API key is checked exactly as a bearer token is (``api.deps.
  current_tenant``: the failed-authentication limit per address, the key's rate limit) and then
  forgotten; the browser gets ``sq_session``, a signed token naming the key's row (``api.web.tokens``).
  Each request checks the signature and expiry, then reads the key's row and whether the session was
  signed out, in one query: revoking or expiring the key ends its sessions at once. Signing out records
  the session's id in ``web_session_revocations`` until its token expires (at most
  ``web_session_hours``), so a copy of the cookie is refused from then on, and deletes the cookie; the
  key's other sessions go on.
* **CSRF**: every POST carries ``csrf_token`` (a form field, or the ``X-CSRF-Token`` header from the
  page's script), the HMAC of this browser's ``sq_csrf`` nonce and its session id; and a request a
  browser marks cross-site (``Sec-Fetch-Site``, or an ``Origin`` of another host) is refused before
  anything else. Both cookies are HttpOnly, SameSite=Strict and ``Path=/web``: the JSON API under
  ``/v1`` never receives them, and accepts bearer keys only, as before.
* ``STYLEQUEUE_AUTH=off``: no sign-in; every page acts as the local tenant, for loopback clients only
  (``current_tenant``'s own rule), and forms still need their CSRF token (another site open in the same
  browser must not submit to a local API).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.deps import TenantCtx, current_tenant
from api.imagestore import insert_ignore
from api.ratelimit import STATE_KEY, limiter_for
from api.web.tokens import (
    SessionToken,
    csrf_matches,
    csrf_token,
    is_nonce,
    load_secret,
    new_nonce,
    sign,
    verify,
)
from shared.errors import Forbidden, Unauthorized
from shared.models import ApiKey, Tenant, WebSessionRevocation, utcnow
from shared.settings import Settings
from shared.tenants import aware, hash_key

SESSION_COOKIE = "sq_session"
CSRF_COOKIE = "sq_csrf"
COOKIE_PATH = "/web"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MAX_KEY_CHARS = 200
_SECRET_LOCK = threading.Lock()


@dataclass(frozen=True)
class WebUser:
    tenant: TenantCtx
    csrf: str  # the token this page's forms carry
    signed_in: bool  # False with STYLEQUEUE_AUTH=off: no sign-in, no sign-out
    sid: str = ""
    expires: int = 0  # when the session's token expires (unix s); 0 without a session


def secret_of(app: Any) -> bytes:
    """The app's web secret, loaded once (``api.web.tokens.load_secret``)."""
    with _SECRET_LOCK:
        secret: bytes | None = getattr(app.state, "web_secret", None)
        if secret is None:
            secret = app.state.web_secret = load_secret(app.state.settings)
        return secret


def browser_nonce(request: Request) -> str:
    """This browser's CSRF nonce: its ``sq_csrf`` cookie, or a new one (``set_cookies`` sends it)."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if nonce is not None and is_nonce(nonce):
        return nonce
    fresh: str | None = getattr(request.state, "web_new_nonce", None)
    if fresh is None:
        fresh = request.state.web_new_nonce = new_nonce()
    return fresh


def _live_key(session: Session, token: SessionToken) -> tuple[str, str | None] | None:
    """The tenant's name and rate limit while the session's key is neither revoked nor expired and the
    session was not signed out (one query: the key's row, and a primary-key lookup of the sid)."""
    signed_out = select(WebSessionRevocation.sid).where(WebSessionRevocation.sid == token.sid).exists()
    row = session.execute(
        select(Tenant.name, Tenant.rate_limit, ApiKey.revoked_at, ApiKey.expires_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.id == token.key_id, Tenant.id == token.tenant_id, ~signed_out)
    ).first()
    session.rollback()  # a read: the connection goes back to the pool at once
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and aware(row.expires_at) <= utcnow():
        return None
    return row.name, row.rate_limit


def resolve(request: Request, session: Session, settings: Settings, *, count: bool = True) -> WebUser | None:
    """The page's user, or None when signed out. ``count``: the request counts against the key's
    rate limit (pages, actions, streams; not the images a page shows)."""
    secret = secret_of(request.app)
    nonce = browser_nonce(request)
    if settings.auth == "off":
        tenant = current_tenant(request, session, settings, None)  # loopback only
        return WebUser(tenant, csrf_token(secret, nonce, ""), signed_in=False)
    token = verify(secret, request.cookies.get(SESSION_COOKIE), time.time())
    live = _live_key(session, token) if token is not None else None
    if token is None or live is None:
        return None
    name, rate_limit = live
    if count:
        window = limiter_for(request.app, settings).hit_key(token.key_id, rate_limit)
        if window is not None:
            setattr(request.state, STATE_KEY, window.headers())
    tenant = TenantCtx(token.tenant_id, name, token.prefix)
    csrf = csrf_token(secret, nonce, token.sid)
    return WebUser(tenant, csrf, signed_in=True, sid=token.sid, expires=token.expires)


def sign_in(request: Request, session: Session, settings: Settings, api_key: str) -> tuple[str, int]:
    """A session cookie's value and lifetime (s) for a valid ``api_key``; else ``Unauthorized`` (or
    429 after too many failures from this address), as the API answers a bearer key."""
    key = api_key.strip()[:MAX_KEY_CHARS]
    tenant = current_tenant(
        request, session, settings, HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)
    )
    row = session.execute(select(ApiKey.id, ApiKey.expires_at).where(ApiKey.key_hash == hash_key(key))).one()
    session.rollback()
    now = time.time()
    ends = now + settings.web_session_hours * 3600
    if row.expires_at is not None:
        ends = min(ends, aware(row.expires_at).timestamp())
    token = SessionToken(row.id, tenant.id, tenant.key_prefix or "", int(ends), new_nonce())
    return sign(secret_of(request.app), token), max(1, int(ends - now))


def _host_of(url: str) -> str:
    return urlsplit(url).netloc.lower()


def check_same_origin(request: Request, settings: Settings) -> None:
    """Refuse what a browser tells us came from another site (before the body is read)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden("cross_site_request", "this form may only be sent from the stylequeue page itself")
    origin = request.headers.get("origin")
    if origin is None:
        return
    allowed = {request.headers.get("host", "").lower()}
    if settings.public_url:
        allowed.add(_host_of(settings.public_url))
    if _host_of(origin) not in allowed:
        raise Forbidden("cross_site_request", "this form may only be sent from the stylequeue page itself")


def check_csrf(request: Request, settings: Settings, user: WebUser, given: str | None) -> None:
    """The origin check, then the form's token against this browser's nonce and session."""
    check_same_origin(request, settings)
    secret = secret_of(request.app)
    if not csrf_matches(secret, request.cookies.get(CSRF_COOKIE), user.sid, given):
        raise Forbidden(
            "csrf_failed",
            "the form's security token is missing or out of date: reload the page and try again",
        )


def _secure(request: Request, settings: Settings) -> bool:
    return request.url.scheme == "https" or settings.public_url.startswith("https://")


def set_cookie(
    response: Response, request: Request, settings: Settings, name: str, value: str, **kw: Any
) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
        **kw,
    )


def set_cookies(response: Response, request: Request, settings: Settings) -> None:
    """The nonce made while rendering (``browser_nonce``), if this browser had none."""
    fresh: str | None = getattr(request.state, "web_new_nonce", None)
    if fresh is not None:
        set_cookie(response, request, settings, CSRF_COOKIE, fresh)


def end_session(session: Session, sid: str, expires: int) -> None:
    """Refuse the session ``sid`` from now on (``resolve``), until its token expires anyway.

    In the same transaction, delete the rows whose tokens have expired (``verify`` refuses those by
    itself): the table holds at most the sessions signed out within the last ``web_session_hours``."""
    session.execute(delete(WebSessionRevocation).where(WebSessionRevocation.expires_at <= utcnow()))
    ends = datetime.fromtimestamp(expires, timezone.utc)
    insert_ignore(session, WebSessionRevocation, [{"sid": sid, "expires_at": ends}])  # signed out twice
    session.commit()


def sign_out(
    response: Response, request: Request, settings: Settings, session: Session, user: WebUser | None
) -> None:
    """End the session ``user`` holds, if any (``end_session``: a copy of the cookie is refused too),
    delete its cookie and rotate the nonce (the next page gets a new one)."""
    if user is not None and user.signed_in:
        end_session(session, user.sid, user.expires)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(
            name, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request, settings)
        )


def signed_out() -> Unauthorized:
    return Unauthorized("signed_out", "you are signed out (or your session ended): sign in again")


__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "WebUser",
    "browser_nonce",
    "check_csrf",
    "check_same_origin",
    "end_session",
    "resolve",
    "set_cookie",
    "set_cookies",
    "sign_in",
    "sign_out",
    "signed_out",
]
