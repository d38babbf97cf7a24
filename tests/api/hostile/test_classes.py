"""Every class of hostile input from the security review, sent to a live API (uvicorn, PostgreSQL).

Each case asserts the 4xx status, the specific error code, the error body's shape, and that no row
and no stored object was created (``live_api.counts()`` before and after).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.images import png_bytes
from tests.support.live import TINY_PARAMS, LiveApi

SCALE_LOOP = {"size": 2048, "min_size": 16, "scale_factor": 1.0000000000000002}
DEEP = "[" * 5000 + "]" * 5000
NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400"]


def _cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _scan_bomb(repeats: int = 200) -> bytes:
    """A progressive JPEG whose last scan is repeated: each scan re-decodes the whole image."""
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 30, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * repeats + b"\xff\xd9"


def _mpo_scan_bomb(repeats: int = 200) -> bytes:
    """The scan bomb as an MPO (a JPEG with a multi-picture header, as phones write them)."""
    buf = io.BytesIO()
    first, second = Image.new("RGB", (256, 256), (9, 90, 9)), Image.new("RGB", (32, 32))
    first.save(buf, "MPO", progressive=True, save_all=True, append_images=[second])
    data = buf.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * repeats + b"\xff\xd9"


@dataclass(frozen=True)
class Case:
    send: Callable[[httpx.Client, LiveApi], httpx.Response]
    status: int
    code: str


def multipart(fields: dict[str, str]) -> list[tuple[str, tuple[None, bytes]]]:
    """Text fields as multipart parts (``data=`` alone would send them urlencoded)."""
    return [(k, (None, v.encode("utf-8", "surrogatepass"))) for k, v in fields.items()]


def job_form(params: str | dict[str, Any] | None = None, **fields: str) -> Callable[..., Any]:
    def send(c: httpx.Client, api: LiveApi) -> httpx.Response:
        data = {"content_id": api.content_id, "style_id": api.style_id, **fields}
        if params is not None:
            data["params"] = params if isinstance(params, str) else json.dumps(params)
        return c.post("/v1/jobs", files=multipart(data))

    return send


def batch_json(body: str | Callable[[LiveApi], str]) -> Callable[..., Any]:
    def send(c: httpx.Client, api: LiveApi) -> httpx.Response:
        raw = body(api) if callable(body) else body
        return c.post(
            "/v1/batches",
            content=raw.encode("utf-8", "surrogatepass"),
            headers={"content-type": "application/json"},
        )

    return send


def _batch_body(api: LiveApi, contents: str | None = None, params: str = "{}", extra: str = "") -> str:
    contents = contents if contents is not None else json.dumps([api.content_id])
    return f'{{"contents": {contents}, "styles": {json.dumps([api.style_id])}, "params": {params}{extra}}}'


def get(path: str | Callable[[LiveApi], str]) -> Callable[..., Any]:
    return lambda c, api: c.get(path(api) if callable(path) else path)


CASES: dict[str, Case] = {
    # --- unbounded scale loop and amplification
    "scale_factor 1+2**-52": Case(job_form(SCALE_LOOP), 422, "invalid_parameter"),
    "scale_factor 1.1 from 16 to 2048 (51 scales)": Case(
        job_form({"size": 2048, "min_size": 16, "scale_factor": 1.1}), 422, "too_many_scales"
    ),
    "17 explicit scales": Case(
        job_form({"scales": list(range(32, 100, 4)), "size": 96, "min_size": 32}), 422, "too_many_scales"
    ),
    "descending scales": Case(
        job_form({"scales": [2048, 16], "size": 2048, "min_size": 16}), 422, "invalid_parameter"
    ),
    "style_scale 4 at 2048 px (8192 px styles)": Case(
        job_form({"size": 2048, "style_scale": 4, "iterations": 1}), 422, "size_too_large"
    ),
    "scale loop in a JSON batch": Case(
        batch_json(lambda a: _batch_body(a, params=json.dumps(SCALE_LOOP))), 422, "invalid_parameter"
    ),
    "too much work (2048 px, 500 iterations per scale)": Case(
        job_form({"size": 2048, "iterations": 500}), 422, "too_much_work"
    ),
    # --- non-finite and huge numbers
    **{
        f"{n} in {field}": Case(
            job_form(f'{{"size": 32, "min_size": 32, "{field}": {v}}}'), 400, "invalid_number"
        )
        for n in NUMBERS
        for field, v in (
            ("style_weights", f"[{n}]"),
            ("content_weight", n),
            ("style_weight", n),
            ("tv_weight", n),
        )
    },
    "NaN in a JSON batch's params": Case(
        batch_json(lambda a: _batch_body(a, params='{"tv_weight": NaN}')), 400, "invalid_number"
    ),
    "size 10**400": Case(job_form('{"size": 1' + "0" * 400 + "}"), 400, "invalid_number"),
    "seed of 5000 digits": Case(job_form('{"seed": 1' + "0" * 5000 + "}"), 400, "invalid_number"),
    "pairs with a 5000-digit index": Case(
        lambda c, a: c.post(
            "/v1/batches",
            files=multipart(
                {
                    "content_id": a.content_id,
                    "style_id": a.style_id,
                    "mode": "pairs",
                    "pairs": "[[1" + "0" * 5000 + ", 0]]",
                }
            ),
        ),
        400,
        "invalid_number",
    ),
    "pairs with booleans": Case(
        lambda c, a: c.post(
            "/v1/batches",
            files=multipart(
                {
                    "content_id": a.content_id,
                    "style_id": a.style_id,
                    "mode": "pairs",
                    "pairs": "[[true, [false]]]",
                }
            ),
        ),
        422,
        "invalid_pairs",
    ),
    "size 1e20 as a float": Case(job_form('{"size": 1e20}'), 422, "invalid_parameter"),
    # --- deep nesting
    "deep params": Case(job_form(DEEP), 400, "too_deep"),
    "deep pairs": Case(
        lambda c, a: c.post(
            "/v1/batches",
            files=multipart(
                {"content_id": a.content_id, "style_id": a.style_id, "mode": "pairs", "pairs": DEEP}
            ),
        ),
        400,
        "too_deep",
    ),
    "unterminated string of escaped quotes (was quadratic)": Case(
        job_form("[" * 17 + '"' + '\\"' * 20_000), 400, "malformed_params"
    ),
    "40 kB body of escaped quotes": Case(batch_json("[" * 17 + '"' + '\\"' * 20_000), 400, "malformed_json"),
    "deep batch body": Case(batch_json(DEEP), 400, "too_deep"),
    "deep params in a batch body": Case(batch_json(lambda a: _batch_body(a, params=DEEP)), 400, "too_deep"),
    "unbalanced deep params": Case(job_form("[" * 20_000), 400, "too_deep"),
    "deep cursor": Case(get("/v1/jobs?cursor=" + _cursor("[" * 60 + "]" * 60)), 422, "invalid_cursor"),
    "over-long cursor": Case(get("/v1/jobs?cursor=" + _cursor(DEEP)), 422, "invalid_cursor"),
    # --- NUL and lone surrogates
    **{
        f"NUL in {p}": Case(get(p), 404, code)
        for p, code in (
            ("/v1/jobs/%00", "job_not_found"),
            ("/v1/images/%00", "unknown_image"),
            ("/v1/batches/%00", "batch_not_found"),
            ("/v1/jobs/%00/result", "job_not_found"),
            ("/v1/jobs/%00/checkpoints/0", "job_not_found"),
            ("/v1/jobs/%00/checkpoints/0/preview", "job_not_found"),
        )
    },
    "NUL in cancel": Case(lambda c, a: c.post("/v1/jobs/%00/cancel"), 404, "job_not_found"),
    "NUL in batch_id": Case(get("/v1/jobs?batch_id=%00"), 422, "invalid_batch_id"),
    "NUL in status": Case(get("/v1/jobs?status=%00"), 422, "invalid_status"),
    "NUL in a style_id field": Case(job_form(style_id="a\x00b"), 400, "invalid_text"),
    "NUL in the params field": Case(job_form('{"init": "content\\u0000"}'), 400, "invalid_text"),
    "NUL in JSON contents": Case(
        batch_json(lambda a: _batch_body(a, contents='["\\u0000"]')), 400, "invalid_text"
    ),
    "lone surrogate in JSON contents": Case(
        batch_json(lambda a: _batch_body(a, contents='["\\ud800"]')), 400, "invalid_text"
    ),
    "raw lone surrogate bytes in a body": Case(
        batch_json(lambda a: _batch_body(a, contents='["\ud800"]')), 400, "malformed_json"
    ),
    "NUL in a cursor": Case(
        get("/v1/jobs?cursor=" + _cursor('["2024-01-01T00:00:00", "\\u0000"]')), 422, "invalid_cursor"
    ),
    "surrogate in a cursor": Case(
        get("/v1/jobs?cursor=" + _cursor('["2024-01-01T00:00:00", "\\ud800"]')), 422, "invalid_cursor"
    ),
    "not an image id": Case(job_form(content_id="../../etc/passwd"), 422, "unknown_image"),
    "control character in Idempotency-Key": Case(
        lambda c, a: c.post(
            "/v1/jobs",
            headers={"Idempotency-Key": "k\x7f"},
            data={"content_id": a.content_id, "style_id": a.style_id},
        ),
        400,
        "invalid_idempotency_key",
    ),
    # --- id lists and body limits
    "5,000 ids in a JSON batch": Case(
        batch_json(
            lambda a: _batch_body(
                a,
                contents=json.dumps([f"{i:064x}" for i in range(5000)]),
                extra=', "mode": "pairs", "pairs": [[0, 0]]',
            )
        ),
        422,
        "batch_too_large",
    ),
    "70,000 ids in a JSON batch (4.7 MB)": Case(
        batch_json(
            lambda a: _batch_body(
                a,
                contents=json.dumps([f"{i:064x}" for i in range(70_000)]),
                extra=', "mode": "pairs", "pairs": [[0, 0]]',
            )
        ),
        413,
        "request_too_large",
    ),
    "two Content-Type headers (JSON limit, multipart route)": Case(
        lambda c, a: c.post(
            "/v1/batches",
            content=b"x" * 2_000_000,
            headers=[
                ("content-type", "application/json"),
                ("content-type", "multipart/form-data; boundary=x"),
            ],
        ),
        400,
        "malformed_request",
    ),
    "1.3 MB of text fields in one form": Case(
        lambda c, a: c.post(
            "/v1/batches",
            files=[("style_id", (None, b"f" * 60_000))] * 22
            + [("content_id", (None, a.content_id.encode()))],
        ),
        413,
        "request_too_large",
    ),
    "2 MB JSON body sent chunked (no length)": Case(
        lambda c, a: c.post(
            "/v1/batches",
            content=iter([b'{"contents": ["' + b"a" * 2_000_000, b'"], "styles": []}']),
            headers={"content-type": "application/json"},
        ),
        413,
        "request_too_large",
    ),
    # --- shapes the engine cannot run
    "600x16 content at 64 px (becomes 64x2)": Case(
        lambda c, a: c.post(
            "/v1/jobs",
            files=[("content", ("c.png", _png(600, 16)))],
            data={"style_id": a.style_id, "params": json.dumps({"size": 64, "min_size": 32})},
        ),
        422,
        "image_too_narrow",
    ),
    "JPEG scan bomb (200 repeated scans)": Case(
        lambda c, a: c.post("/v1/images", files={"file": ("b.jpg", _scan_bomb())}), 422, "too_many_scans"
    ),
    "MPO scan bomb (200 repeated scans)": Case(
        lambda c, a: c.post("/v1/images", files={"file": ("b.jpg", _mpo_scan_bomb())}), 422, "too_many_scans"
    ),
    "JSON batch with Content-Type in capitals": Case(
        lambda c, a: c.post(
            "/v1/batches",
            content=json.dumps({"contents": ["f" * 64], "styles": [a.style_id]}).encode(),
            headers={"content-type": "Application/JSON"},
        ),
        422,
        "unknown_image",
    ),
    "2 MB urlencoded form": Case(
        lambda c, a: c.post("/v1/jobs", data={"params": "x" * 2_000_000}), 413, "request_too_large"
    ),
    "16x600 style at style_scale 0.5": Case(
        lambda c, a: c.post(
            "/v1/jobs",
            files=[("style", ("s.png", _png(16, 600)))],
            data={"content_id": a.content_id, "params": json.dumps({**TINY_PARAMS, "style_scale": 0.5})},
        ),
        422,
        "image_too_narrow",
    ),
    # --- content masks (spatial control): counts, shapes, ids, indexes
    "a tall mask over a wide content (uploaded)": Case(
        lambda c, a: c.post(
            "/v1/jobs",
            files=[("mask", ("m.png", _png(48, 64, "L")))],
            data={"content_id": a.content_id, "style_id": a.style_id, "params": json.dumps(TINY_PARAMS)},
        ),
        422,
        "mask_shape_mismatch",
    ),
    "an unknown mask id": Case(job_form(TINY_PARAMS, mask_id="0" * 64), 422, "unknown_image"),
    "two masks for one style": Case(
        lambda c, a: c.post(
            "/v1/jobs",
            files=multipart({"content_id": a.content_id, "style_id": a.style_id})
            + [("mask_id", (None, a.content_id.encode()))] * 2,
        ),
        422,
        "mask_count_mismatch",
    ),
    "another tenant's mask": Case(
        lambda c, a: job_form(TINY_PARAMS, mask_id=a.image_b)(c, a), 422, "unknown_image"
    ),
    "masks in a product batch": Case(
        batch_json(lambda a: _batch_body(a, extra=f', "masks": {json.dumps([a.content_id])}')),
        422,
        "masks_need_pairs",
    ),
    "a mask index of 10**18": Case(
        batch_json(
            lambda a: _batch_body(
                a,
                extra=f', "masks": {json.dumps([a.content_id])}, "mode": "pairs", '
                '"pairs": [[0, 0, [1000000000000000000]]]',
            )
        ),
        422,
        "invalid_pairs",
    ),
    "a mask count other than the pair's styles": Case(
        batch_json(
            lambda a: _batch_body(
                a,
                extra=f', "masks": {json.dumps([a.content_id])}, "mode": "pairs", "pairs": [[0, 0, [0, 0]]]',
            )
        ),
        422,
        "mask_count_mismatch",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_is_a_specific_4xx_and_changes_nothing(live_api: LiveApi, name: str) -> None:
    case = CASES[name]
    before = live_api.counts()
    mark = live_api.log_size()
    with live_api.client() as c:
        r = case.send(c, live_api)
    errors = live_api.errors_since(mark)
    assert (r.status_code, r.headers.get("content-type")) == (case.status, "application/json"), (
        r.text[:300],
        errors,
    )
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == case.code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert not errors
    assert live_api.counts() == before


def test_narrow_image_named_by_id_is_refused(live_api: LiveApi) -> None:
    """The shape check uses the stored dimensions of an uploaded image too."""
    with live_api.client() as c:
        image_id = c.post("/v1/images", files={"file": ("n.png", _png(700, 16))}).json()["id"]
        before = live_api.counts()
        r = c.post(
            "/v1/batches",
            json={
                "contents": [image_id],
                "styles": [live_api.style_id],
                "params": {"size": 64, "min_size": 32},
            },
        )
    assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_narrow", r.text
    assert live_api.counts() == before


def test_scale_loop_request_is_refused_while_healthz_answers(live_api: LiveApi) -> None:
    """The request that used to freeze the event loop for good, sent 20 times from 4 threads while
    another thread polls /healthz: every one is refused and every health check answers."""
    answers: list[int] = []
    health: list[int] = []
    done = threading.Event()

    def attack() -> None:
        with live_api.client() as c:
            for _ in range(5):
                answers.append(job_form(SCALE_LOOP)(c, live_api).status_code)

    def poll() -> None:
        with live_api.client(None, timeout=5) as c:
            while not done.is_set() or not health:
                health.append(c.get("/healthz").status_code)

    threads = [threading.Thread(target=attack) for _ in range(4)]
    poller = threading.Thread(target=poll)
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    poller.join()
    assert answers == [422] * 20
    assert health and set(health) == {200}


def test_bomb_batch_is_decoded_off_the_event_loop(live_api: LiveApi) -> None:
    """Two 6300x6300 PNGs of zeros (39.7 MP each, ~120 kB) and a truncated style in one batch:
    refused (422, nothing stored) after decoding them all, while /healthz keeps answering. Timing
    is bench/hostile.py's job; here the API must answer at all while the decode runs."""
    bomb = _png(6300, 6300, "L")
    whole = _png(300, 300)
    files = [
        ("content", ("a.png", bomb)),
        ("content", ("b.png", bomb)),
        ("style", ("s.png", whole[: len(whole) // 2])),
    ]
    before = live_api.counts()
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with live_api.client(timeout=60) as c:
            result["r"] = c.post("/v1/batches", files=files)

    sender = threading.Thread(target=send)
    sender.start()
    health: list[int] = []
    with live_api.client(None, timeout=5) as c:
        while sender.is_alive() or not health:
            health.append(c.get("/healthz").status_code)
    sender.join()
    r = result["r"]
    assert r.status_code == 422 and r.json()["error"]["code"] == "truncated", r.text
    assert set(health) == {200}
    assert live_api.counts() == before


def test_request_pixel_budget_refuses_before_decoding(live_api: LiveApi) -> None:
    """Eight 39.7 MP images in one request exceed max_request_pixels (256 MP): refused at once."""
    bomb = _png(6300, 6300, "L")
    files = [("content", (f"{i}.png", bomb)) for i in range(8)]
    files.append(("style", ("s.png", png_bytes(7))))
    before = live_api.counts()
    with live_api.client(timeout=60) as c:
        r = c.post("/v1/batches", files=files)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_pixels", r.text
    assert live_api.counts() == before


def test_a_slow_sender_gets_408_and_holds_no_upload_slot(tmp_path: Any) -> None:
    """A client that sends headers and then nothing is cut off after body_timeout_s; meanwhile
    (and with every upload slot's worth of such clients) ordinary uploads go through."""
    import socket

    from tests.support.live import standalone_api

    with standalone_api(tmp_path, body_timeout_s=2, max_inflight_uploads=1) as api:
        head = (
            f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key_a}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n"
            "\r\n--b\r\n"
        ).encode()
        slow = [socket.create_connection(("127.0.0.1", api.port), timeout=30) for _ in range(3)]
        for sock in slow:
            sock.sendall(head)
        with api.client() as c:
            ok = c.post("/v1/images", files={"file": ("p.png", png_bytes(99))})
        answers = [sock.recv(4096).split(b"\r\n", 1)[0] for sock in slow]
        for sock in slow:
            sock.close()
    assert ok.status_code == 201, ok.text
    assert answers == [b"HTTP/1.1 408 Request Timeout"] * 3


def test_links_never_come_from_the_host_header(live_api: LiveApi) -> None:
    """A finished job's links (result, checkpoint, preview) are relative without PUBLIC_URL."""
    from sqlalchemy import create_engine, text

    with live_api.client() as c:
        job_id = job_form(TINY_PARAMS)(c, live_api).json()["id"]
    checkpoints = json.dumps(
        [{"key": f"jobs/{job_id}/c.pt", "preview_key": f"jobs/{job_id}/c.png", "seq": 0, "step": 1}]
    )
    engine = create_engine(live_api.database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', result_key = :r, "
                "checkpoints = CAST(:c AS JSON) WHERE id = :id"
            ),
            {"r": f"jobs/{job_id}/result.a1.png", "c": checkpoints, "id": job_id},
        )
    engine.dispose()
    with live_api.client(headers={"Host": "evil.example"}) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    links = [job["result_url"], job["checkpoints"][0]["url"], job["checkpoints"][0]["preview_url"]]
    assert links == [
        f"/v1/jobs/{job_id}/result",
        f"/v1/jobs/{job_id}/checkpoints/1",  # by its step
        f"/v1/jobs/{job_id}/checkpoints/1/preview",
    ]


def test_openapi_describes_bodies_auth_and_downloads(live_api: LiveApi) -> None:
    with live_api.client(None) as c:
        spec = c.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())
    post_batch = spec["paths"]["/v1/batches"]["post"]
    assert post_batch["security"]
    body = post_batch["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    params = body["application/json"]["schema"]["properties"]["params"]
    assert {"size", "scale_factor", "style_weights"} <= set(params["properties"])
    assert params["properties"]["scale_factor"]["minimum"] == 1.1
    result = spec["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert "image/png" in result and "application/json" not in result
    preview = spec["paths"]["/v1/jobs/{job_id}/checkpoints/{step}/preview"]["get"]
    assert set(preview["responses"]["200"]["content"]) == {"image/png"}
    for path in ("/v1/jobs/{job_id}/result/thumb", "/v1/jobs/{job_id}/checkpoints/{step}/thumb"):
        assert set(spec["paths"][path]["get"]["responses"]["200"]["content"]) == {"image/jpeg"}, path
    assert "200" in spec["paths"]["/v1/images"]["post"]["responses"]
    assert "202" in spec["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
