"""Rendering the pages: the Jinja2 templates (autoescaped), the security headers every page gets, the
error page, and ``page``/``action``, which wrap a page's or a form's handler with the sign-in and
CSRF checks and turn the API's errors into words on a page."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from api.web.auth import WebUser, check_csrf, resolve, set_cookies
from shared import logs
from shared.errors import DomainError
from shared.settings import Settings

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
# What each notice code of a redirect (?notice=...) says: fixed words, never text from the URL.
NOTICES = {
    "canceled": "The job was canceled.",
    "cancel_requested": "The job was asked to stop; it stops within seconds.",
    "already_finished": "The job had already finished: nothing to cancel.",
    "job_deleted": "The job was deleted.",
    "job_deleting": "The job is stopping; its files are deleted once it has.",
    "batch_canceled": "The batch's queued jobs were canceled and its running ones asked to stop.",
    "batch_deleted": "The batch was deleted.",
    "signed_out": "You are signed out.",
}


def content_security_policy(settings: Settings) -> str:
    """Everything from this origin only; images also from the storage's presigned URLs (S3)."""
    images = ["'self'", "data:", "blob:"]
    if settings.storage_url.startswith("s3://"):
        endpoint = urlsplit(settings.s3_endpoint_url or "")
        images.append(f"{endpoint.scheme}://{endpoint.netloc}" if endpoint.netloc else "https:")
    return "; ".join(
        [
            "default-src 'self'",
            f"img-src {' '.join(images)}",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def secure_headers(response: Response, settings: Settings) -> Response:
    response.headers["Content-Security-Policy"] = content_security_policy(settings)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def render(
    request: Request,
    settings: Settings,
    name: str,
    context: dict[str, Any],
    *,
    user: WebUser | None = None,
    status: int = 200,
) -> Response:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    full = {"user": user, "auth": settings.auth, "notice": notice, **context}
    response = TEMPLATES.TemplateResponse(request, name, full, status_code=status)
    set_cookies(response, request, settings)
    return secure_headers(response, settings)


def error_page(request: Request, settings: Settings, exc: DomainError, user: WebUser | None) -> Response:
    """An API error as a page: its status, its code and its message (words written for people)."""
    context = {"code": exc.code, "message": exc.message, "status": exc.status}
    response = render(request, settings, "error.html", context, user=user, status=exc.status)
    for key, value in exc.headers().items():
        response.headers[key] = value
    return response


def to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/web/login?next={quote(here, safe='')}", status_code=303)


def page(
    request: Request, session: Session, settings: Settings, build: Callable[[WebUser], Response]
) -> Response:
    """A page: signed-out browsers go to the sign-in page; an error is shown in words."""
    user: WebUser | None = None
    try:
        user = resolve(request, session, settings)
        if user is None:
            return to_login(request)
        return build(user)
    except DomainError as exc:
        return error_page(request, settings, exc, user)


def action(
    request: Request,
    session: Session,
    settings: Settings,
    given_csrf: str | None,
    run: Callable[[WebUser], str],
) -> Response:
    """A form's POST: same origin, signed in, its CSRF token; ``run`` returns where to go next (303)."""
    user: WebUser | None = None
    try:
        user = resolve(request, session, settings)
        if user is None:  # the form's page asks again once signed in (a POST cannot be replayed)
            return RedirectResponse("/web/login", status_code=303)
        check_csrf(request, settings, user, given_csrf)
        target = run(user)
    except DomainError as exc:
        logs.event(logger, "web_action_refused", kind="request", path=request.url.path, code=exc.code)
        return error_page(request, settings, exc, user)
    return RedirectResponse(target, status_code=303)


__all__ = ["NOTICES", "TEMPLATES", "action", "error_page", "page", "render", "secure_headers", "to_login"]
