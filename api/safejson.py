"""Bounded JSON parsing for request bodies, form fields and cursors.

``json.loads`` alone accepts what the rest of the service cannot hold or should not see: ``NaN`` and
``Infinity`` (PostgreSQL's JSON rejects them), ``1e400`` (parsed as infinity), integers of thousands
of digits (Python refuses past 4,300 with a ValueError), nesting deep enough to raise RecursionError,
and strings with NUL (PostgreSQL text cannot hold 0x00) or lone surrogates (not encodable as UTF-8).
``loads`` refuses every one of them with a 400 and a specific code, before any of it is used.
The cost is linear in the size of the text, which the caller bounds; large bodies are parsed in a
worker thread (``api.routes``), never on the event loop.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from shared.errors import InvalidInput, PayloadTooLarge

MAX_DEPTH = 16  # the deepest legitimate body is a batch's pairs: {"pairs": [[0, [1, 2]]]} (depth 4)
MAX_INT_DIGITS = 19  # up to 2**63: every integer the API accepts is far below
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


class _Refused(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refuse_constant(name: str) -> Any:
    raise _Refused("invalid_number", f"{name} is not a number this API accepts")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused("invalid_number", f"an integer of {len(digits)} digits is out of range")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("invalid_number", f"{text[:40]} is out of the range of a 64-bit float")
    return value


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth within ``max_depth``, every string and key free of NUL and lone surrogates: one
    iterative walk (no recursion), linear in the size of the parsed value."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _BAD_TEXT.search(item):
                raise _Refused("invalid_text", "strings must not contain NUL characters or lone surrogates")
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise _Refused("too_deep", f"nested more than {max_depth} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def loads(raw: bytes | str, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` as JSON within the limits; raise ``InvalidInput`` (400) or ``PayloadTooLarge``.

    ``what`` names the input in messages ("the body", "params", "pairs", "cursor"); error codes are
    ``malformed_json`` or ``malformed_<what>`` for syntax, ``invalid_number``, ``invalid_text``,
    ``too_deep``, and ``request_too_large``."""
    syntax_code = "malformed_json" if what == "the body" else f"malformed_{what}"
    if len(raw) > max_bytes:
        raise PayloadTooLarge(
            "request_too_large", f"{what} is {len(raw):,} bytes; the limit is {max_bytes:,}"
        )
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(syntax_code, f"{what} is not UTF-8 text", malformed=True) from None
    try:
        # json's C scanner is linear in the text and stops at Python's recursion limit (~1,000
        # levels) with a RecursionError; the walk then enforces the real limit.
        value = json.loads(
            raw, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
        _check_tree(value, max_depth)
    except RecursionError:
        raise InvalidInput(
            "too_deep", f"{what} is nested more than {max_depth} levels deep", malformed=True
        ) from None
    except _Refused as exc:
        raise InvalidInput(exc.code, f"{what}: {exc}", malformed=True) from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            syntax_code, f"{what} is not valid JSON ({exc.msg} at char {exc.pos})", malformed=True
        ) from None
    except ValueError:
        raise InvalidInput(syntax_code, f"{what} is not valid JSON", malformed=True) from None
    return value


def check_text(value: str, what: str) -> str:
    """A form field's name or value free of NUL (400 ``invalid_text``). Decoded form text cannot
    hold a lone surrogate, so a plain substring test is enough (and fast on the event loop)."""
    if "\x00" in value:
        raise InvalidInput(
            "invalid_text", f"{what} must not contain NUL characters or lone surrogates", malformed=True
        )
    return value


__all__ = ["MAX_DEPTH", "check_text", "loads"]
