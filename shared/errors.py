"""Domain errors raised in code; ``api/errors.py`` is the one place that renders them to HTTP.

Each error carries a machine-readable ``code`` (stable, snake_case) and a ``message`` a user can
act on.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: ``code`` for programs, ``message`` for people."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details  # extra keys rendered inside the error object (e.g. status)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class NotFound(DomainError):
    """The thing does not exist, or belongs to another tenant (HTTP 404)."""


class InvalidInput(DomainError):
    """Well-formed request, unacceptable content (HTTP 422; 400 when ``malformed``)."""

    def __init__(self, code: str, message: str, *, malformed: bool = False, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.malformed = malformed


class PayloadTooLarge(InvalidInput):
    """A file or body above the configured limit (HTTP 413)."""


class RequestTimeout(InvalidInput):
    """The request body did not arrive in time (HTTP 408)."""


class Unauthorized(DomainError):
    """Missing, unknown or revoked API key (HTTP 401)."""


class Conflict(DomainError):
    """The action does not fit the current state, e.g. canceling a finished job (HTTP 409)."""


class ServiceUnavailable(DomainError):
    """A dependency (database, broker, storage) is down; retry later (HTTP 503 with Retry-After)."""

    def __init__(self, code: str, message: str, *, retry_after_s: int = 5, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.retry_after_s = retry_after_s


__all__ = [
    "Conflict",
    "DomainError",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServiceUnavailable",
    "Unauthorized",
]
