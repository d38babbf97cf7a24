"""Each domain error declares its HTTP status and headers; one renderer uses them."""

from __future__ import annotations

import pytest

from api.errors import render
from shared import errors as e


@pytest.mark.parametrize(
    "exc, status, headers",
    [
        (e.InvalidInput("bad", "m"), 422, {}),
        (e.InvalidInput("bad", "m", malformed=True), 400, {}),
        (e.PayloadTooLarge("big", "m"), 413, {}),
        (e.PayloadTooLarge("big", "m", malformed=True), 413, {}),  # too large stays 413
        (e.RequestTimeout("slow", "m"), 408, {}),
        (e.NotFound("gone", "m"), 404, {}),
        (e.Unauthorized("who", "m"), 401, {"WWW-Authenticate": "Bearer"}),
        (e.Conflict("state", "m"), 409, {}),
        (e.ServiceUnavailable("down", "m", retry_after_s=7), 503, {"Retry-After": "7"}),
        (e.Forbidden("never", "m"), 403, {}),
        (e.TooManyRequests("slow_down", "m", retry_after_s=0), 429, {"Retry-After": "1"}),
    ],
)
def test_status_and_headers_come_from_the_error(
    exc: e.DomainError, status: int, headers: dict[str, str]
) -> None:
    assert render(exc) == (status, {"error": {"code": exc.code, "message": "m"}}, headers)


def test_every_domain_error_declares_a_status() -> None:
    classes = [c for c in vars(e).values() if isinstance(c, type) and issubclass(c, e.DomainError)]
    assert len(classes) == 11  # with Gone (410), added alongside
    for cls in classes:
        assert 400 <= cls.http_status < 600, cls
