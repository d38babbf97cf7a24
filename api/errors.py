"""The one place that renders errors to HTTP. Every error body is
``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import metrics
from shared import logs
from shared.db import is_db_outage
from shared.errors import DomainError

logger = logging.getLogger(__name__)

DB_RETRY_AFTER_S = 5

_STATUS_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    400: "bad_request",
    401: "unauthorized",
    413: "payload_too_large",
}


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """An error answer's body; counted by its code (``stylequeue_api_rejections_total``)."""
    metrics.rejected(code)
    return {"error": {"code": code, "message": message, **details}}


def status_for(exc: DomainError) -> int:
    """The HTTP status of a domain error: declared on its class (shared.errors)."""
    return exc.status


def render(exc: DomainError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of a domain error: the one rendering, for the exception handler and
    for the body-limit middleware, which answers before the app runs."""
    return exc.status, error_body(exc.code, exc.message, **exc.details), exc.headers()


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    status, body, headers = render(exc)
    return JSONResponse(body, status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return JSONResponse(error_body("invalid_request", "; ".join(parts) or "invalid request"), 422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)


async def _db_error(request: Request, exc: Exception) -> JSONResponse:
    if is_db_outage(exc):
        return await _db_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _db_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logs.event(
        logger,
        "db_unavailable",
        kind="request",
        level=logging.ERROR,
        path=request.url.path,
        error=type(exc).__name__,
    )
    return JSONResponse(
        error_body("database_unavailable", "the database is unreachable; retry shortly"),
        503,
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logs.event(
        logger,
        "unhandled_error",
        kind="request",
        level=logging.ERROR,
        exc_info=True,
        path=request.url.path,
        error=type(exc).__name__,
    )
    return JSONResponse(error_body("internal_error", "unexpected server error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _db_error)  # OperationalError, InterfaceError...
    app.add_exception_handler(PoolTimeoutError, _db_unavailable)
    app.add_exception_handler(Exception, _unexpected)


__all__ = ["error_body", "install_error_handlers", "render", "status_for"]
