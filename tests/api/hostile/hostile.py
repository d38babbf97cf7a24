"""Hostile requests (hypothesis strategies) and the one judge of the API's answers.

Shared by tests/api/hostile/test_properties.py (a few hundred examples per target) and bench/fuzz.py
(thousands). A strategy draws a :class:`Probe`: one fully built HTTP request (raw bytes: JSON text
with ``NaN``, ``1e400``, 5000-digit integers, 2000-deep nesting, ``\\u0000``, lone surrogates, form
fields that are not UTF-8...). :meth:`Fuzzer.send` sends it to a :class:`~tests.support.live.LiveApi`
and checks the properties every answer must have:

* no 5xx, no timeout, no dropped connection (an API that stops answering ``/healthz`` is SIGKILLed
  and restarted, and the probe is reported as having frozen it);
* a 4xx body is JSON ``{"error": {"code": str, "message": str, ...}}``;
* a rejected request (>= 400) changed no row count and stored no object (``LiveApi.counts()``);
* a submission naming an image tenant A does not own is never accepted, and tenant B never gets a
  2xx for A's job, batch or image.

Violations are collected, not raised, so one run reports every distinct failure class (operation,
status, the exception class the API logged), each with its smallest example.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from tests.support.live import LiveApi

# --- JSON text of hostile values --------------------------------------------------------------

NASTY_CHARS = [
    "\x00",
    "\ud800",
    "\udfff",
    "\udc80",
    "\ufffe",
    "\uffff",
    "\u202e",
    "\U0010ffff",
    "\x7f",
    "\n",
    "%",
    "/",
    "\\",
    '"',
    "'",
]
NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\x00" * 64,
    "../../etc/passwd",
    "%00",
    "null",
    "NaN",
    "1e400",
    "🎨" * 50,
    "A" * 10_000,
]
NASTY_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "5e-324",
    "-0.0",
    "0",
    "-1",
    "1e-400",
    str(2**31),
    str(2**31 - 1),
    str(2**63),
    str(2**64),
    str(10**309),
    str(-(10**309)),
    str(10**400),
    "1" + "0" * 4300,
    "1" + "0" * 5000,
    "-" + "9" * 5000,
    "1." + "0" * 5000,
]
DEPTHS = [2, 10, 100, 500, 998, 999, 1000, 1001, 1500, 2000]
# What a typed field gets most often: the values JSON parsers and databases disagree on.
SPECIAL_FLOATS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e308",
    "-1e308",
    "5e-324",
    "-0.0",
    "0.0",
    "1e-400",
]
SPECIAL_INTS = [
    "0",
    "-1",
    str(2**31),
    str(2**63),
    str(2**64),
    str(10**309),
    str(-(10**309)),
    str(10**400),
    "1" + "0" * 4300,
    "1" + "0" * 5000,
]

PARAM_KEYS = [
    "size",
    "min_size",
    "scale_factor",
    "scales",
    "iterations",
    "style_weights",
    "content_weight",
    "style_weight",
    "tv_weight",
    "optimizer",
    "lr",
    "init",
    "preserve_color",
    "style_scale",
    "seed",
    "pooling",
    "precision",
    "output_format",
    "quality",
]
FLOAT_KEYS = ["scale_factor", "content_weight", "style_weight", "tv_weight", "lr", "style_scale"]
INT_KEYS = ["size", "min_size", "seed", "quality"]
LIST_KEYS = ["scales", "iterations", "style_weights"]
CHOICE_KEYS = {
    "optimizer": ["lbfgs", "adam"],
    "init": ["content", "noise", "gray"],
    "pooling": ["max", "avg"],
    "precision": ["auto", "fp32", "bf16", "fp16"],
    "output_format": ["png", "jpeg", "webp"],
}
# A valid, cheap job the "one bad field" strategies start from: one 32 px scale, one iteration.
BASE_PARAMS: dict[str, Any] = {"size": 32, "min_size": 32, "iterations": 1}
# scale_factor in (1, SAFE_SCALE_FACTOR) made the unfixed API loop for ever (security review,
# finding 1); random probes keep out of it and test_properties covers it with explicit probes.
SAFE_SCALE_FACTOR = 1.01


def enc(text: str) -> bytes:
    """UTF-8, lone surrogates included (as the invalid bytes a hostile client would send)."""
    return text.encode("utf-8", "surrogatepass")


def jstr(s: str, ascii_only: bool = True) -> str:
    return json.dumps(s, ensure_ascii=ascii_only)


def jfloat(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def pick(values: list[str]) -> st.SearchStrategy[str]:
    """``sampled_from`` without a 30 kB repr (some values are 5000 characters long)."""

    def nth(i: int) -> str:
        return values[i]

    return st.integers(0, len(values) - 1).map(nth)


hostile_chars = st.one_of(st.sampled_from(NASTY_CHARS), st.characters(exclude_categories=()))
hostile_str = st.one_of(pick(NASTY_STRINGS), st.text(hostile_chars, max_size=40))
j_number = st.one_of(
    pick(NASTY_NUMBERS),
    st.floats().map(jfloat),
    st.integers().map(str),
    st.integers(min_value=300, max_value=6000).map(lambda n: "9" * n),
)
j_string = st.builds(jstr, hostile_str, st.booleans())
j_scalar = st.one_of(j_number, j_string, st.sampled_from(["true", "false", "null"]))


def _nest(core: str, depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + core + "]" * depth
    return '{"a":' * depth + core + "}" * depth


j_deep = st.builds(
    _nest, j_scalar, st.sampled_from(DEPTHS) | st.integers(1, 2000), st.sampled_from(["list", "object"])
)
j_value = st.recursive(
    st.one_of(j_scalar, j_deep),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.sampled_from(PARAM_KEYS) | hostile_str, inner, max_size=3).map(
            lambda d: "{" + ",".join(f"{jstr(k)}:{v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=6,
)


def _near_one(text: str) -> bool:
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return False
    return 1.0 < value < SAFE_SCALE_FACTOR


def value_for(key: str) -> st.SearchStrategy[str]:
    """Hostile JSON text for one params key: typed extremes for the key, or anything at all."""
    typed: st.SearchStrategy[str]
    special = st.one_of(pick(SPECIAL_FLOATS), pick(SPECIAL_INTS))
    if key in FLOAT_KEYS:
        typed = st.one_of(pick(SPECIAL_FLOATS), special, j_number, st.floats(0, 10).map(jfloat))
    elif key in INT_KEYS:
        typed = st.one_of(pick(SPECIAL_INTS), special, j_number, st.integers(-5, 5000).map(str))
    elif key in LIST_KEYS:
        item = st.one_of(special, special, j_number, st.integers(1, 4000).map(str))
        typed = st.one_of(
            item.map(lambda x: f"[{x}]"),  # one value: the length a one-style job needs
            item.map(lambda x: f"[{x}]"),
            st.lists(item, min_size=0, max_size=20).map(lambda xs: "[" + ",".join(xs) + "]"),
            st.builds(lambda x, n: "[" + ",".join([x] * n) + "]", item, st.integers(1, 200)),
            item,
        )
    elif key in CHOICE_KEYS:
        typed = st.one_of(st.sampled_from(CHOICE_KEYS[key]).map(jstr), j_string)
    else:
        typed = st.one_of(st.sampled_from(["true", "false", "0", "1"]), j_scalar)
    out = st.one_of(typed, typed, typed, j_value)
    return out.filter(lambda t: not _near_one(t)) if key == "scale_factor" else out


def _obj(items: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{jstr(k)}:{v}" for k, v in items) + "}"


@st.composite
def params_text(draw: st.DrawFn) -> str:
    """The text of a ``params`` JSON object (or of something that is not one)."""
    kind = draw(st.sampled_from(["one_bad", "one_bad", "random", "whole"]))
    if kind == "one_bad":  # valid except one or two fields: reaches the limits and the database
        items = {k: json.dumps(v) for k, v in BASE_PARAMS.items()}
        if draw(st.booleans()):
            items["style_weights"] = "[1]"
        for key in draw(st.lists(st.sampled_from(PARAM_KEYS), min_size=1, max_size=2, unique=True)):
            items[key] = draw(value_for(key))
        return _obj(list(items.items()))
    if kind == "random":
        keys = draw(st.lists(st.sampled_from(PARAM_KEYS) | hostile_str, max_size=6, unique=True))
        return _obj([(k, draw(value_for(k))) for k in keys])
    return draw(st.one_of(j_value, j_deep, st.sampled_from(["", " ", "{", "{}}", "[]", "nul"])))


# --- probes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    """What a probe may name: A's objects and one image of B's."""

    own_images: tuple[str, ...]
    image_b: str
    job_id: str
    batch_id: str

    @classmethod
    def of(cls, api: LiveApi) -> Ids:
        return cls(tuple(api.image_ids), api.image_b, api.job_id, api.batch_id)


@dataclass(frozen=True)
class Probe:
    operation: str  # "POST /v1/jobs", "GET /v1/jobs/{job_id}", ...
    method: str
    target: str  # path and query, percent-encoded
    what: str  # the hostile part, in words
    content: bytes | None = None
    content_type: str | None = None
    key: str = "a"
    must_reject: bool = False  # names an image A does not own: a 2xx is a failure
    foreign_read: bool = False  # B reading A's object: a 2xx is a failure
    part: str = ""  # where the hostile value is ("cursor", "params (form)"...): part of the class

    def size(self) -> int:
        return len(self.target) + len(self.content or b"")

    def describe(self, limit: int = 400) -> str:
        lines = [f"{self.method} {_clip(self.target, limit)}  (key {self.key}; {self.what})"]
        if self.content is not None:
            lines.append(f"  content-type: {self.content_type}")
            lines.append(f"  body ({len(self.content)} bytes): {_clip(repr(self.content), limit)}")
        return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ...[{len(text) - limit} more]... {text[-half:]}"


BOUNDARY = "hostile-" + "b" * 24


def multipart(fields: list[tuple[str, str | bytes]]) -> tuple[bytes, str]:
    out = bytearray()
    for name, value in fields:
        data = value if isinstance(value, bytes) else enc(value)
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={BOUNDARY}"


def own_ref(ids: Ids) -> st.SearchStrategy[tuple[str, bool]]:
    return st.sampled_from(ids.own_images).map(lambda i: (i, False))


def image_ref(ids: Ids) -> st.SearchStrategy[tuple[str, bool]]:
    """(an image id, whether it is NOT one of A's): own, B's, random, hostile."""
    own = own_ref(ids)
    other = st.one_of(
        st.just(ids.image_b),
        st.uuids().map(lambda u: (u.hex * 2)[:64]),
        hostile_str,
        st.sampled_from(ids.own_images).map(lambda i: i + "\x00"),
        st.sampled_from(ids.own_images).map(lambda i: i.upper()),
    ).map(lambda i: (i, i.strip() not in ids.own_images))
    return st.one_of(own, own, other)


def params_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    """``params`` as a form field of ``POST /v1/jobs`` or of a multipart batch, or in a JSON batch."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Probe:
        text = draw(params_text())
        raw = enc(text)  # raw (not \u-escaped) surrogates come from j_string's ascii_only=False
        route = draw(st.sampled_from(["jobs", "jobs", "batch-json", "batch-form"]))
        c, s = ids.own_images[0], ids.own_images[1]
        what = f"params={_clip(text, 120)}"
        if route == "jobs":
            body, ctype = multipart([("content_id", c), ("style_id", s), ("params", raw)])
            return Probe("POST /v1/jobs", "POST", "/v1/jobs", what, body, ctype, part="params (form)")
        if route == "batch-form":
            body, ctype = multipart([("content_id", c), ("style_id", s), ("params", raw)])
            return Probe(
                "POST /v1/batches",
                "POST",
                "/v1/batches",
                "multipart " + what,
                body,
                ctype,
                part="params (form)",
            )
        body = b'{"contents":[' + enc(jstr(c)) + b'],"styles":[' + enc(jstr(s)) + b'],"params":'
        return Probe(
            "POST /v1/batches",
            "POST",
            "/v1/batches",
            "json " + what,
            body + raw + b"}",
            "application/json",
            part="params (json)",
        )

    return build()


# The params values of the security review's finding 6 (a-d), always sent first (explicit examples).
REVIEW_PARAMS = [
    '{"size":32,"min_size":32,"iterations":1,"style_weights":[NaN]}',
    '{"size":32,"min_size":32,"iterations":1,"content_weight":Infinity}',
    '{"size":32,"min_size":32,"iterations":1,"tv_weight":1e400}',
    '{"size":1' + "0" * 400 + "}",
    '{"seed":1' + "0" * 5000 + "}",
    "[" * 100_000,
]


def params_seed_probes(ids: Ids) -> list[Probe]:
    c, s = ids.own_images[0], ids.own_images[1]
    out = []
    for text in REVIEW_PARAMS:
        body, ctype = multipart([("content_id", c), ("style_id", s), ("params", text)])
        out.append(
            Probe(
                "POST /v1/jobs",
                "POST",
                "/v1/jobs",
                f"params={_clip(text, 120)}",
                body,
                ctype,
                part="params (form)",
            )
        )
        head = b'{"contents":[' + enc(jstr(c)) + b'],"styles":[' + enc(jstr(s)) + b'],"params":'
        out.append(
            Probe(
                "POST /v1/batches",
                "POST",
                "/v1/batches",
                f"json params={_clip(text, 120)}",
                head + enc(text) + b"}",
                "application/json",
                part="params (json)",
            )
        )
    return out


def batch_json_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    """JSON bodies of ``POST /v1/batches``: ids own/foreign/hostile, modes, pairs, whole bodies."""

    def id_list(draw: Callable[..., Any], clean: bool) -> tuple[str, bool]:
        n = draw(st.integers(0, 4))
        refs = [draw(own_ref(ids) if clean else image_ref(ids)) for _ in range(n)]
        items = [draw(st.sampled_from([jstr(r), jstr(r, False)])) for r, _ in refs]
        if draw(st.integers(0, 9)) == 0:
            items.append(draw(j_value))  # a non-string id
        return "[" + ",".join(items) + "]", any(bad for _, bad in refs) or len(items) > n

    @st.composite
    def build(draw: Callable[..., Any]) -> Probe:
        if draw(st.integers(0, 7)) == 0:  # the whole body
            body = draw(st.one_of(j_value, j_deep, st.sampled_from(["", "{", "[]", "nul", "{}"])))
            return Probe(
                "POST /v1/batches",
                "POST",
                "/v1/batches",
                f"body={_clip(body, 120)}",
                enc(body),
                "application/json",
                must_reject=True,
                part="whole json body",
            )
        clean = draw(st.booleans())  # only A's own ids: reaches the checks after ownership
        contents, bad_c = id_list(draw, clean)
        styles, bad_s = id_list(draw, clean)
        items = [("contents", contents), ("styles", styles)]
        mode = draw(st.sampled_from([None, "product", "pairs", "pairs", "x"]))
        if mode is not None:
            items.append(("mode", jstr(mode) if mode != "x" else draw(j_scalar)))
        if mode == "pairs" or draw(st.integers(0, 4)) == 0:
            pair_item = st.one_of(st.integers(-2, 4).map(str), j_number)
            pair = st.one_of(
                st.lists(pair_item, min_size=2, max_size=2).map(lambda p: "[" + ",".join(p) + "]"),
                st.tuples(pair_item, st.lists(pair_item, max_size=9)).map(
                    lambda p: f"[{p[0]},[{','.join(p[1])}]]"
                ),
                j_value,
            )
            items.append(
                (
                    "pairs",
                    draw(
                        st.one_of(st.lists(pair, max_size=5).map(lambda ps: "[" + ",".join(ps) + "]"), j_deep)
                    ),
                )
            )
        if draw(st.booleans()):
            items.append(("params", draw(st.sampled_from([json.dumps(BASE_PARAMS), "{}"]) | params_text())))
        if draw(st.integers(0, 9)) == 0:
            items.append((draw(hostile_str), draw(j_value)))
        body = _obj(items)
        return Probe(
            "POST /v1/batches",
            "POST",
            "/v1/batches",
            f"json={_clip(body, 160)}",
            enc(body),
            "application/json",
            must_reject=bad_c or bad_s,
            part="json batch fields",
        )

    return build()


def batch_form_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    """Multipart ``POST /v1/batches`` and ``POST /v1/jobs`` naming ids (no files)."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Probe:
        route = draw(st.sampled_from(["jobs", "batches"]))
        fields: list[tuple[str, str | bytes]] = []
        bad = False
        refs = own_ref(ids) if draw(st.booleans()) else image_ref(ids)
        for name, lo, hi in (("content_id", 1, 1 if route == "jobs" else 3), ("style_id", 1, 3)):
            for _ in range(draw(st.integers(lo, hi))):
                ref, foreign = draw(refs)
                fields.append((name, ref))
                bad = bad or (foreign and ref.strip() != "")  # the API skips empty form fields
        if route == "batches":
            if draw(st.booleans()):
                fields.append(("mode", draw(st.sampled_from(["product", "pairs"]) | hostile_str)))
            if draw(st.booleans()):
                fields.append(
                    (
                        "pairs",
                        draw(
                            st.one_of(
                                st.sampled_from(["[[0,0]]", "[[0,[0,1]]]", "[[-1,0]]", "[[0,99]]"]),
                                j_value,
                                j_deep,
                            )
                        ),
                    )
                )
        fields.append(("params", json.dumps(BASE_PARAMS)))
        body, ctype = multipart(fields)
        what = " ".join(f"{n}={_clip(ascii(v), 60)}" for n, v in fields)
        return Probe(
            f"POST /v1/{route}",
            "POST",
            f"/v1/{route}",
            what,
            body,
            ctype,
            must_reject=bad,
            part="form fields",
        )

    return build()


def path_segment(ids: Ids) -> st.SearchStrategy[str]:
    return st.one_of(
        hostile_str,
        st.sampled_from([ids.job_id, ids.batch_id, *ids.own_images]).map(lambda i: i + "\x00"),
        st.sampled_from([ids.job_id, ids.batch_id, *ids.own_images, str(uuid.UUID(int=0))]),
        st.uuids().map(str),
    )


PATH_OPS = [
    ("GET /v1/jobs/{job_id}", "GET", "/v1/jobs/{x}"),
    ("GET /v1/jobs/{job_id}/result", "GET", "/v1/jobs/{x}/result"),
    ("GET /v1/jobs/{job_id}/checkpoints/{step}", "GET", "/v1/jobs/{x}/checkpoints/{i}"),
    ("GET /v1/jobs/{job_id}/checkpoints/{step}/preview", "GET", "/v1/jobs/{x}/checkpoints/{i}/preview"),
    ("POST /v1/jobs/{job_id}/cancel", "POST", "/v1/jobs/{x}/cancel"),
    ("GET /v1/images/{image_id}", "GET", "/v1/images/{x}"),
    ("GET /v1/batches/{batch_id}", "GET", "/v1/batches/{x}"),
]


def path_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    """Hostile path ids (and checkpoint indexes), as A, or as B on A's objects."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Probe:
        op, method, template = draw(st.sampled_from(PATH_OPS))
        x = draw(path_segment(ids))
        if method == "POST" and x == ids.job_id:
            x = ids.job_id + "\x00"  # keep A's job queued for other tests
        index = draw(st.one_of(st.integers(-3, 3).map(str), j_number, hostile_str))
        key = draw(st.sampled_from(["a", "a", "a", "b"]))
        own = {ids.job_id, ids.batch_id, *ids.own_images}
        target = template.format(x=quote(enc(x), safe=""), i=quote(enc(index), safe=""))
        what = f"id={_clip(ascii(x), 80)}" + (
            f" index={_clip(ascii(index), 40)}" if "{i}" in template else ""
        )
        return Probe(
            op,
            method,
            target,
            what,
            b"" if method == "POST" else None,
            None,
            key=key,
            foreign_read=key == "b" and x in own,
            part="path",
        )

    return build()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


STAMPS = ["2024-01-01T00:00:00", "9999-12-31T23:59:59.999999", "0001-01-01", "2024-01-01T00:00:00+14:00"]
BAD_STAMPS = ["2024-13-45T99:99:99", "+275760-09-13", "2024-01-01T00:00:00\x00", "", "\ud800"]


def cursor_value() -> st.SearchStrategy[str]:
    """``?cursor=``: base64url of ``[created_at, job_id]`` with a hostile part, or anything else."""
    stamp = st.sampled_from(STAMPS)
    hostile_id = st.one_of(
        st.sampled_from(["\x00", "\ud800", "a\x00b", "\udfff"]), st.sampled_from(NASTY_CHARS), hostile_str
    ).map(jstr)
    with_id = st.builds(lambda s, j: _b64(enc(f"[{jstr(s)},{j}]")), stamp, hostile_id)
    return st.one_of(
        with_id,
        with_id,
        st.builds(lambda s, j: _b64(enc(f"[{jstr(s)},{j}]")), stamp, j_value),
        st.builds(
            lambda s: _b64(enc(f"[{jstr(s)},{jstr(str(uuid.UUID(int=1)))}]")),
            st.sampled_from(BAD_STAMPS) | hostile_str,
        ),
        st.builds(
            lambda d, closed: _b64(enc("[" * d + ("]" * d if closed else ""))),
            st.sampled_from(DEPTHS) | st.integers(1, 6000),
            st.booleans(),
        ),
        st.builds(lambda v: _b64(enc(v)), j_value | j_deep),
        st.binary(max_size=64).map(_b64),
        hostile_str,
    )


def query_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    """``GET /v1/jobs``: one of ``status``, ``batch_id``, ``cursor``, ``limit`` hostile, the
    others valid or absent (so the hostile one is not masked by an earlier 422)."""
    hostile = {
        "status": hostile_str,
        "batch_id": path_segment(ids),
        "cursor": cursor_value(),
        "limit": st.integers(-2, 300).map(str) | j_number,
    }
    valid = {
        "status": st.sampled_from(["queued", "canceled", "succeeded"]),
        "batch_id": st.sampled_from([ids.batch_id, str(uuid.UUID(int=2))]),
        "cursor": st.sampled_from([_b64(enc(f'["{STAMPS[0]}","{uuid.UUID(int=3)}"]'))]),
        "limit": st.sampled_from(["1", "50", "200"]),
    }

    @st.composite
    def build(draw: Callable[..., Any]) -> Probe:
        focus = draw(st.sampled_from(["status", "batch_id", "cursor", "cursor", "limit"]))
        pairs = [(focus, draw(hostile[focus]))]
        for name in valid:
            if name != focus and draw(st.integers(0, 2)) == 0:
                pairs.append((name, draw(valid[name])))
        if draw(st.integers(0, 9)) == 0:
            pairs.append((draw(hostile_str), draw(hostile_str)))  # an unknown parameter
        query = "&".join(f"{quote(enc(k), safe='')}={quote(enc(v), safe='')}" for k, v in pairs)
        what = " ".join(f"{k}={_clip(ascii(v), 80)}" for k, v in pairs)
        return Probe("GET /v1/jobs", "GET", f"/v1/jobs?{query}", what, part=f"?{focus}")

    return build()


def all_probes(ids: Ids) -> st.SearchStrategy[Probe]:
    return st.one_of(
        params_probes(ids),
        batch_json_probes(ids),
        batch_form_probes(ids),
        path_probes(ids),
        query_probes(ids),
    )


def scale_factor_probes(ids: Ids) -> list[Probe]:
    """The requests that froze the unfixed API (review finding 1): sent one by one, not at random."""
    out = []
    for factor in ("1.0000000000000002", "1.000001", "1.000002", "1.001"):
        text = f'{{"size":2048,"min_size":16,"scale_factor":{factor},"iterations":1}}'
        body, ctype = multipart(
            [("content_id", ids.own_images[0]), ("style_id", ids.own_images[1]), ("params", text)]
        )
        out.append(
            Probe(
                "POST /v1/jobs", "POST", "/v1/jobs", f"params={text}", body, ctype, part="params.scale_factor"
            )
        )
    return out


def huge_list_probes(ids: Ids, n: int = 70_000) -> list[Probe]:
    """A JSON batch naming ``n`` distinct ids for one job (review finding 6g: past psycopg's 65,535
    bound parameters the unfixed API answered a false 503 ``database_unavailable``)."""
    fake = [f"{i:064x}" for i in range(n)]
    body = json.dumps(
        {
            "contents": [ids.own_images[0], *fake],
            "styles": [ids.own_images[1]],
            "mode": "pairs",
            "pairs": [[0, 0]],
        }
    ).encode()
    return [
        Probe(
            "POST /v1/batches",
            "POST",
            "/v1/batches",
            f"json with {n + 2} ids, pairs [[0,0]]",
            body,
            "application/json",
            must_reject=True,
            part="id list length",
        )
    ]


# --- sending and judging ----------------------------------------------------------------------


class HealthWatch:
    """Polls ``/healthz`` from a thread while a request is in flight: ``worst`` is the longest
    wait for an answer (a request that blocks the event loop shows up here, whatever it returns)."""

    def __init__(self, api: LiveApi, timeout: float = 5.0, interval: float = 0.05) -> None:
        import threading

        self.api, self.timeout, self.interval = api, timeout, interval
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.api.base_url, timeout=self.timeout) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    c.get("/healthz")
                self.worst = max(self.worst, time.monotonic() - start)
                self._stop.wait(self.interval)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 1)


@dataclass
class Failure:
    operation: str  # "POST /v1/jobs [params (form)]": the route and where the hostile value was
    status: str  # "500", "timeout", "connection", "201"...
    problem: str  # "DataError", "froze the API", "bad error body", "created rows", ...
    count: int = 0
    probe: Probe | None = None
    detail: str = ""

    def describe(self) -> str:
        head = f"{self.operation} -> {self.status}: {self.problem} (x{self.count})"
        probe = self.probe.describe() if self.probe else ""
        return f"{head}\n  {probe}\n  {_clip(self.detail, 600)}".rstrip()


@dataclass
class Fuzzer:
    """Sends probes to ``api`` one at a time and collects every violated property by class."""

    api: LiveApi
    timeout: float = 10.0
    sent: int = 0
    server_errors: int = 0
    accepted: int = 0
    restarts: int = 0
    failures: dict[tuple[str, str, str], Failure] = field(default_factory=dict)
    slowest: list[tuple[float, str]] = field(default_factory=list)
    _clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, key: str) -> httpx.Client:
        if key not in self._clients:
            self._clients[key] = self.api.client(key, timeout=self.timeout)
        return self._clients[key]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def record(self, probe: Probe, status: str, problem: str, detail: str) -> None:
        operation = f"{probe.operation} [{probe.part}]" if probe.part else probe.operation
        key = (operation, status, problem)
        f = self.failures.setdefault(key, Failure(operation, status, problem))
        f.count += 1
        if f.probe is None or probe.size() < f.probe.size():
            f.probe, f.detail = probe, detail

    def send(self, probe: Probe) -> httpx.Response | None:
        before = self.api.counts()
        mark = self.api.log_size()
        headers = {"content-type": probe.content_type} if probe.content_type else {}
        start = time.monotonic()
        try:
            r = self.client(probe.key).request(
                probe.method, probe.target, content=probe.content, headers=headers
            )
        except httpx.TimeoutException:
            self.sent += 1
            restarted = self.api.ensure_alive()
            self.restarts += restarted
            self.record(
                probe,
                "timeout",
                "froze the API" if restarted else "slow answer",
                f"no answer in {self.timeout:.0f}s; "
                f"{'API killed and restarted' if restarted else '/healthz still answered'}",
            )
            return None
        except httpx.TransportError as exc:
            self.sent += 1
            restarted = self.api.ensure_alive()
            self.restarts += restarted
            self.record(
                probe,
                "connection",
                type(exc).__name__,
                f"{exc!r}; errors logged: {self.api.errors_since(mark)}"
                + ("; API restarted" if restarted else ""),
            )
            return None
        elapsed = time.monotonic() - start
        self.sent += 1
        self.slowest = sorted(
            [*self.slowest, (elapsed, probe.operation + " " + probe.what[:80])], reverse=True
        )[:5]
        self._judge(probe, r, before, mark)
        return r

    def _judge(self, probe: Probe, r: httpx.Response, before: dict[str, int], mark: int) -> None:
        status = r.status_code
        if status >= 500:
            self.server_errors += 1
            errors = self.api.errors_since(mark)
            self.record(
                probe,
                str(status),
                ", ".join(sorted(set(errors))) or "(nothing logged)",
                f"response: {r.text[:200]}",
            )
        elif 400 <= status < 500 and not _error_shape_ok(r):
            self.record(
                probe,
                str(status),
                "bad error body",
                f"content-type {r.headers.get('content-type')}: {r.text[:200]}",
            )
        if status >= 400:
            after = self.api.counts()
            if after != before:
                diff = {k: after[k] - before[k] for k in after if after[k] != before[k]}
                self.record(
                    probe,
                    str(status),
                    "rejected but created " + ",".join(sorted(diff)),
                    f"count changes {diff}",
                )
        elif 200 <= status < 300:
            self.accepted += 1
            if probe.must_reject and probe.method == "POST":
                self.record(probe, str(status), "accepted an image A does not own", r.text[:300])
            if probe.foreign_read:
                self.record(probe, str(status), "tenant B read A's object", r.text[:300])

    def report(self, title: str = "hostile probes") -> str:
        lines = [
            f"{title}: {self.sent} requests, {self.server_errors} x 5xx, {self.accepted} accepted,"
            f" {len(self.failures)} distinct failures, {self.restarts} API restarts"
        ]
        for f in sorted(self.failures.values(), key=lambda f: (f.operation, f.status, f.problem)):
            lines.append(f.describe())
        return "\n".join(lines)


def _error_shape_ok(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)


__all__ = [
    "Failure",
    "Fuzzer",
    "HealthWatch",
    "Ids",
    "Probe",
    "all_probes",
    "batch_form_probes",
    "batch_json_probes",
    "huge_list_probes",
    "multipart",
    "params_probes",
    "params_text",
    "params_seed_probes",
    "path_probes",
    "query_probes",
    "scale_factor_probes",
]
