"""Domain errors raised in code; ``api/errors.py`` is the one place that renders them to HTTP.

Each error is built as ``Error(code, message)`` (the engine's EngineError takes the same order): a
machine-readable ``code`` (stable, snake_case) and a ``message`` a user can act on. Each class
declares its HTTP status (``http_status``) and the headers it needs, so the renderer has no table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class DomainError(Exception):
    """Base class: ``code`` for programs, ``message`` for people."""

    http_status: ClassVar[int] = 400

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details  # extra keys rendered inside the error object (e.g. status)

    @property
    def status(self) -> int:
        """The HTTP status this error is answered with."""
        return self.http_status

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (none by default)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class NotFound(DomainError):
    """The thing does not exist, or belongs to another tenant (HTTP 404)."""

    http_status = 404


class InvalidInput(DomainError):
    """Well-formed request, unacceptable content (HTTP 422; 400 when ``malformed``)."""

    http_status = 422

    def __init__(self, code: str, message: str, *, malformed: bool = False, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.malformed = malformed

    @property
    def status(self) -> int:
        return 400 if self.malformed and self.http_status == 422 else self.http_status


class PayloadTooLarge(InvalidInput):
    """A file or body above the configured limit (HTTP 413)."""

    http_status = 413


class RequestTimeout(InvalidInput):
    """The request body did not arrive in time (HTTP 408)."""

    http_status = 408


class Unauthorized(DomainError):
    """Missing, unknown or revoked API key (HTTP 401, with ``WWW-Authenticate: Bearer``)."""

    http_status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Conflict(DomainError):
    """The action does not fit the current state, e.g. canceling a finished job (HTTP 409)."""

    http_status = 409


class ServiceUnavailable(DomainError):
    """A dependency (database, broker, storage) is down; retry later (HTTP 503 with Retry-After)."""

    http_status = 503

    def __init__(self, code: str, message: str, *, retry_after_s: int = 5, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Forbidden(DomainError):
    """Refused whatever the timing, e.g. a submission larger than a whole daily budget (HTTP 403)."""

    http_status = 403


class TooManyRequests(DomainError):
    """Over a rate limit or a quota: retry after ``retry_after_s`` (HTTP 429 with ``Retry-After``, an
    integer >= 1, plus ``extra_headers`` such as the RateLimit fields)."""

    http_status = 429

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_s: int,
        extra_headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(code, message, **details)
        self.retry_after_s = max(1, int(retry_after_s))
        self.extra_headers = dict(extra_headers or {})

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "Retry-After": str(self.retry_after_s)}


class Gone(DomainError):
    """The thing existed and was deleted on purpose, e.g. a result past retention (HTTP 410)."""

    http_status = 410


__all__ = [
    "Conflict",
    "DomainError",
    "Forbidden",
    "Gone",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
]
