"""Reading multipart forms: files with per-file size limits, repeatable fields, JSON fields."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from api.safejson import check_text, loads
from shared.errors import InvalidInput, PayloadTooLarge
from shared.settings import Settings

MAX_FIELD_BYTES = 64 * 1024  # one text field of a form (1,000 batch pairs take about 12 kB)
MAX_FORM_TEXT = 1024 * 1024  # all text fields of a form together (2,000 image ids take 130 kB)


async def read_form(request: Request, *, max_files: int) -> FormData:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidInput(
            "unsupported_media_type",
            "send multipart/form-data (files and fields)",
            malformed=True,
        )
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 4096,
                                  max_part_size=MAX_FIELD_BYTES)
    except HTTPException as exc:  # Starlette's multipart errors (too many files, bad boundary)
        code = "too_many_files" if "files" in str(exc.detail) else "malformed_form"
        raise InvalidInput(code, f"the form could not be read: {exc.detail}",
                           malformed=True) from None
    except (ValueError, KeyError) as exc:
        raise InvalidInput("malformed_form", f"the form could not be read: {exc}",
                           malformed=True) from None
    try:
        text_bytes = 0
        for name, value in form.multi_items():
            check_text(name, "a form field's name")
            if isinstance(value, str):
                check_text(value, f"form field {name[:40]!r}")
                text_bytes += len(value)
        if text_bytes > MAX_FORM_TEXT:
            raise PayloadTooLarge("request_too_large",
                                  f"the form's text fields hold {text_bytes:,} characters; the "
                                  f"limit is {MAX_FORM_TEXT:,} (files do not count)")
    except InvalidInput:
        await form.close()
        raise
    return form


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


async def read_items(items: list[UploadFile | str], settings: Settings,
                     names: list[str]) -> list[tuple[str, bytes] | str]:
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


__all__ = ["MAX_FIELD_BYTES", "files", "json_field", "read_form", "read_items", "read_upload",
           "text", "texts"]
