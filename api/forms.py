"""Reading multipart forms: files with per-file size limits, repeatable fields, JSON fields."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from api.safejson import check_text, loads
from api.schemas import FormSpec
from shared import logs
from shared.errors import InvalidInput, PayloadTooLarge, RequestTimeout
from shared.settings import Settings

logger = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024  # one text field of a form (1,000 batch pairs take about 12 kB)
MAX_FORM_TEXT = 1024 * 1024  # all text fields of a form together (2,000 image ids take 130 kB)


class _TextBudgetParser(MultiPartParser):
    """Starlette's multipart parser, refusing a form whose text fields pass ``MAX_FORM_TEXT`` while
    it streams, so text is never buffered past the budget (files are spooled to disk as usual).
    It counts in ``on_part_data``, before Starlette's own per-field check."""

    text_seen = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is None:
            self.text_seen += end - start
            if self.text_seen > MAX_FORM_TEXT:
                raise MultiPartException(
                    f"the form's text fields exceed {MAX_FORM_TEXT:,} bytes (files do not count)"
                )
        super().on_part_data(data, start, end)


async def _parse(request: Request, ctype: str, max_files: int) -> FormData:
    if ctype.startswith("multipart/form-data"):
        parser = _TextBudgetParser(
            request.headers,
            request.stream(),
            max_files=max_files,
            max_fields=max_files + 4096,
            max_part_size=MAX_FIELD_BYTES,
        )
        return await parser.parse()
    # urlencoded: text only, and its body limit is MAX_FORM_TEXT (api.limits)
    return await request.form(max_files=max_files, max_fields=max_files + 4096, max_part_size=MAX_FIELD_BYTES)


def _form_error(message: str) -> InvalidInput:
    if "text fields exceed" in message:
        return PayloadTooLarge("request_too_large", message)
    if "files" in message:
        return InvalidInput("too_many_files", f"the form could not be read: {message}", malformed=True)
    return InvalidInput("malformed_form", f"the form could not be read: {message}", malformed=True)


async def read_form(request: Request, *, max_files: int, timeout_s: float) -> FormData:
    """The request's form, read within ``timeout_s`` (a slow sender cannot hold a request open
    for ever) and the text budget; every field free of NUL."""
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidInput(
            "unsupported_media_type",
            "send multipart/form-data (files and fields)",
            malformed=True,
        )
    try:
        with anyio.fail_after(timeout_s):
            form = await _parse(request, ctype, max_files)
    except TimeoutError:
        raise RequestTimeout(
            "request_timeout", f"the request body was not received within {timeout_s:g} s"
        ) from None
    except ClientDisconnect:
        raise _disconnected() from None
    except HTTPException as exc:  # Starlette's wrapping of its multipart errors
        raise _form_error(str(exc.detail)) from None
    except MultiPartException as exc:
        raise _form_error(exc.message) from None
    except (ValueError, KeyError) as exc:
        raise InvalidInput("malformed_form", f"the form could not be read: {exc}", malformed=True) from None
    try:
        for name, value in form.multi_items():
            check_text(name, "a form field's name")
            if isinstance(value, str):
                check_text(value, f"form field {name[:40]!r}")
    except InvalidInput:
        await form.close()
        raise
    return form


async def read_body(request: Request, *, timeout_s: float) -> bytes:
    """The whole body (its size is bounded by ``api.limits``), read within ``timeout_s``."""
    try:
        with anyio.fail_after(timeout_s):
            return await request.body()
    except TimeoutError:
        raise RequestTimeout(
            "request_timeout", f"the request body was not received within {timeout_s:g} s"
        ) from None
    except ClientDisconnect:
        raise _disconnected() from None


def _disconnected() -> InvalidInput:
    logs.event(logger, "client_disconnected", kind="request")
    return InvalidInput("client_disconnected", "the client went away mid-request", malformed=True)


def check_fields(form: FormData, spec: FormSpec) -> None:
    """Refuse a field the form does not declare (``unknown_field``)."""
    unknown = sorted(set(form.keys()) - set(spec.names()))
    if not unknown:
        return
    if spec.name_fields_in_errors:
        raise InvalidInput(
            "unknown_field", f"unknown form field {unknown[0]!r}; use {', '.join(spec.names())}"
        )
    raise InvalidInput("unknown_field", f"unknown form field {unknown[0][:80]!r}")


def files(form: FormData, name: str) -> list[UploadFile]:
    return [v for v in form.getlist(name) if isinstance(v, UploadFile)]


def texts(form: FormData, name: str) -> list[str]:
    return [v.strip() for v in form.getlist(name) if isinstance(v, str) and v.strip()]


def text(form: FormData, name: str) -> str | None:
    values = texts(form, name)
    return values[-1] if values else None


async def read_upload(upload: UploadFile, settings: Settings, field: str) -> bytes:
    """Read one uploaded file, refusing it (413) from its parsed size before reading it."""
    limit = settings.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLarge(
            "too_many_bytes",
            f"{field}: the file is {upload.size / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB",
        )
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge("too_many_bytes", f"{field}: the file is over {limit / 1e6:.1f} MB")
    return data


async def read_items(
    items: list[UploadFile | str], settings: Settings, names: list[str]
) -> list[tuple[str, bytes] | str]:
    """Uploads read into memory as (field name, bytes), within the per-file limit; ids as they are."""
    out: list[tuple[str, bytes] | str] = []
    for item, name in zip(items, names, strict=True):
        out.append(item if isinstance(item, str) else (name, await read_upload(item, settings, name)))
    return out


def json_field(raw: str | None, name: str) -> Any:
    """A form field holding JSON (``pairs``), parsed within ``api.safejson``'s limits."""
    if raw is None:
        return None
    return loads(raw, what=name, max_bytes=MAX_FIELD_BYTES)


__all__ = [
    "MAX_FIELD_BYTES",
    "MAX_FORM_TEXT",
    "check_fields",
    "files",
    "json_field",
    "read_body",
    "read_form",
    "read_items",
    "read_upload",
    "text",
    "texts",
]
