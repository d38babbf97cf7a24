"""Request body limits (Starlette sets none): refuse oversized bodies before reading them.

A declared ``Content-Length`` above the route's limit is answered 413 at once; a body without one is
counted as it streams and aborted with 413 when it passes the limit. Per-file limits are checked again
after parsing (``api.forms``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import render
from api.forms import MAX_FORM_TEXT
from shared.errors import InvalidInput, PayloadTooLarge
from shared.settings import Settings

MAX_BATCH_FILES = 64  # files in one multipart batch; larger sets: upload via /v1/images first
_FORM_OVERHEAD = 1024 * 1024


def body_limit(settings: Settings, path: str, content_type: str = "") -> int:
    """The largest body this path and content type may send: a JSON body is parsed whole, so it
    gets its own small limit; a form is spooled to disk as it streams, file by file."""
    if content_type.startswith("application/json"):
        return settings.max_json_bytes
    if content_type.startswith("application/x-www-form-urlencoded"):
        return MAX_FORM_TEXT  # text only: no files in an urlencoded form
    per_file = settings.max_upload_bytes
    if path.startswith("/v1/images"):
        limit = per_file + _FORM_OVERHEAD
    elif path.startswith("/v1/batches") or path == "/web/batches":  # the page submits the same form
        limit = per_file * MAX_BATCH_FILES + _FORM_OVERHEAD
    elif path.startswith("/v1/jobs"):
        limit = per_file * (2 * settings.max_styles + 1) + _FORM_OVERHEAD  # + a mask per style
    else:
        limit = _FORM_OVERHEAD
    return min(limit, settings.max_form_bytes)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        "request_too_large",
        f"the request body exceeds {limit:,} bytes; send fewer or smaller files",
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        ctypes = [v for k, v in scope["headers"] if k == b"content-type"]
        if len(ctypes) > 1:  # the limit and the route must read the same one
            await self._reject(
                send, InvalidInput("malformed_request", "send one Content-Type header", malformed=True)
            )
            return
        ctype = ctypes[0].decode("latin-1").lower() if ctypes else ""
        limit = body_limit(self.settings, scope["path"], ctype)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, _too_large(limit))
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)  # rendered by the DomainError handler
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, send: Send, exc: InvalidInput) -> None:
        import json

        status, payload, extra = render(exc)
        body = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


__all__ = ["MAX_BATCH_FILES", "BodyLimitMiddleware", "body_limit"]
