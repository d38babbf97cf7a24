"""Every kind of bad input answers a JSON error with a 4xx, and creates nothing at all."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shared.settings import Settings
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes

PNG = image_bytes(64, 64, color=1)


def _huge_header_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 MP, a few kB
    return buf.getvalue()


CASES: dict[str, tuple[Callable[[TestClient], Any], int, str]] = {
    "not an image": (lambda c: submit(c, content=b"hello" * 50, styles=[PNG]), 422, "not_an_image"),
    "truncated": (lambda c: submit(c, content=image_bytes(300, 300)[:200], styles=[PNG]), 422, "truncated"),
    "too small": (lambda c: submit(c, content=image_bytes(10, 10), styles=[PNG]), 422, "too_small"),
    "too many pixels": (
        lambda c: submit(c, content=_huge_header_png(), styles=[PNG]),
        422,
        "too_many_pixels",
    ),
    "too many bytes": (
        lambda c: submit(c, content=PNG + b"\0" * 300_000, styles=[PNG]),
        413,
        "too_many_bytes",
    ),
    "style not an image": (lambda c: submit(c, content=PNG, styles=[PNG, b"x" * 99]), 422, "not_an_image"),
    "unsupported format": (
        lambda c: submit(c, content=image_bytes(32, 32, "ICO"), styles=[PNG]),
        422,
        "unsupported_format",
    ),
    "unknown parameter": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"sise": 5}),
        422,
        "unknown_parameter",
    ),
    "value out of range": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"size": 3}),
        422,
        "invalid_parameter",
    ),
    "bad value type": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"optimizer": "sgd"}),
        422,
        "invalid_parameter",
    ),
    "size above max": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"size": 4096}),
        422,
        "size_too_large",
    ),
    "too many iterations": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"iterations": 5000}),
        422,
        "too_many_iterations",
    ),
    "malformed params": (
        lambda c: submit(c, content=PNG, styles=[PNG], params="{size: 1"),
        400,
        "malformed_params",
    ),
    "params not an object": (
        lambda c: submit(c, content=PNG, styles=[PNG], params="[1]"),
        400,
        "malformed_params",
    ),
    "missing content": (lambda c: submit(c, styles=[PNG]), 422, "missing_content"),
    "missing style": (lambda c: submit(c, content=PNG), 422, "missing_style"),
    "too many styles": (lambda c: submit(c, content=PNG, styles=[PNG] * 4), 422, "too_many_styles"),
    "style_weights mismatch": (
        lambda c: submit(c, content=PNG, styles=[PNG], params={"style_weights": [1, 1]}),
        422,
        "style_weights_mismatch",
    ),
    "unknown image id": (
        lambda c: submit(c, data={"content_id": "f" * 64, "style_id": "e" * 64}),
        422,
        "unknown_image",
    ),
    "unknown form field": (
        lambda c: submit(c, content=PNG, styles=[PNG], data={"styles": "x"}),
        422,
        "unknown_field",
    ),
    "not multipart": (lambda c: c.post("/v1/jobs", json={"content": "x"}), 400, "unsupported_media_type"),
    "batch too large": (
        lambda c: c.post(
            "/v1/batches",
            files=[("content", ("a.png", PNG)), ("style", ("b.png", PNG))],
            data={"mode": "pairs", "pairs": json.dumps([[0, 0]] * 9)},
        ),
        422,
        "batch_too_large",
    ),
    "batch pair out of range": (
        lambda c: c.post(
            "/v1/batches",
            files=[("content", ("a.png", PNG)), ("style", ("b.png", PNG))],
            data={"mode": "pairs", "pairs": "[[0, 1]]"},
        ),
        422,
        "invalid_pairs",
    ),
    "batch malformed json": (
        lambda c: c.post("/v1/batches", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "malformed_json",
    ),
    "batch unknown field": (
        lambda c: c.post("/v1/batches", json={"contents": ["a"], "styles": ["b"], "x": 1}),
        422,
        "unknown_field",
    ),
    "batch unknown image": (
        lambda c: c.post("/v1/batches", json={"contents": ["a" * 64], "styles": ["b" * 64]}),
        422,
        "unknown_image",
    ),
    "batch bad image": (
        lambda c: c.post(
            "/v1/batches",
            files=[
                ("content", ("a.png", PNG)),
                ("content", ("b.png", b"zz" * 50)),
                ("style", ("c.png", PNG)),
            ],
        ),
        422,
        "not_an_image",
    ),
    "batch bad params": (
        lambda c: c.post("/v1/batches", json={"contents": ["a"], "styles": ["b"], "params": {"lr": -1}}),
        422,
        "invalid_parameter",
    ),
    "upload not an image": (lambda c: upload(c, b"GIF89a-but-not-really"), 422, "not_an_image"),
    "upload nothing": (lambda c: c.post("/v1/images", files={"other": ("x", PNG)}), 422, "missing_file"),
}


@pytest.fixture
def small_api(settings_factory: Callable[..., Settings]) -> Api:
    return build_api(
        settings_factory(
            max_upload_bytes=200_000, max_styles=3, max_batch_jobs=4, max_image_pixels=40_000_000
        )
    )


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_and_creates_nothing(small_api: Api, case: str) -> None:
    send, status, code = CASES[case]
    before = small_api.counts()
    r = send(small_api.client)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert small_api.counts() == before
    assert small_api.publisher.published == []


def test_body_over_the_limit_is_refused_before_reading(small_api: Api) -> None:
    big = b"\0" * 2_000_000
    r = small_api.client.post("/v1/images", files={"file": ("x.png", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert small_api.counts()["objects"] == 0


def test_streamed_body_over_the_limit_is_cut(small_api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 100_000  # no Content-Length: counted while streaming

    r = small_api.client.post(
        "/v1/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert r.status_code == 413


def test_validation_errors_and_unknown_routes_have_the_error_shape(api: Api) -> None:
    r = api.client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.client.get("/v1/jobs", params={"limit": "x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
