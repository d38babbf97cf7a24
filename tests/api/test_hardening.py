"""Unit tests of the API's hardening: bounded JSON, the params mirror's closed form, auth=off."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from api.safejson import loads
from shared.errors import InvalidInput, PayloadTooLarge
from shared.params import JobParams, long_edges
from tests.support import REPO


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("[" * 20 + "]" * 20, "too_deep"),
        ('{"a": NaN}', "invalid_number"),
        ('{"a": -Infinity}', "invalid_number"),
        ('{"a": 1e400}', "invalid_number"),
        ('{"a": 12345678901234567890}', "invalid_number"),
        ('{"a\\u0000": 1}', "invalid_text"),
        ('["\\udfff"]', "invalid_text"),
        (b'["\xff"]', "malformed_x"),
        ("{nope", "malformed_x"),
    ],
)
def test_loads_refuses(raw: Any, code: str) -> None:
    with pytest.raises(InvalidInput) as err:
        loads(raw, what="x", max_bytes=1000)
    assert err.value.code == code and err.value.malformed


def test_loads_accepts_what_the_api_needs() -> None:
    body = '{"contents": ["a"], "pairs": [[0, [1, 2]]], "params": {"lr": 0.5, "seed": -3}, "s": "[[["}'
    assert loads(body, what="x", max_bytes=1000)["pairs"] == [[0, [1, 2]]]
    assert loads("[" * 16 + "]" * 16, what="x", max_bytes=1000) is not None
    with pytest.raises(PayloadTooLarge):
        loads(body, what="x", max_bytes=10)


@pytest.mark.parametrize("factor", [1 + 2**-52, 1.000001, 1.09, 4.01, float("nan")])
def test_scale_factor_out_of_range_is_refused_at_once(factor: float) -> None:
    with pytest.raises(ValidationError):
        JobParams(size=2048, min_size=16, scale_factor=factor)


def test_scale_count_has_a_closed_form_ceiling() -> None:
    assert len(long_edges(2048, 16, 1.1)) == 52
    with pytest.raises(ValueError, match="too_many_scales|scales"):
        long_edges(2048, 16, 1.1, max_scales=16)
    with pytest.raises(ValidationError, match="scales"):
        JobParams(size=65536, min_size=16, scale_factor=1.1)  # 88 scales > the model's 64


def test_work_bounds_pixels_times_iterations() -> None:
    assert JobParams(size=64, min_size=32, scale_factor=2, iterations=[3, 5]).work() == 32**2 * 3 + 64**2 * 5


def test_auth_off_refuses_a_public_bind(tmp_path: Any) -> None:
    env = {"STYLEQUEUE_AUTH": "off", "STYLEQUEUE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "api", "--host", "0.0.0.0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "refusing to serve 0.0.0.0 with STYLEQUEUE_AUTH=off" in proc.stderr


def test_auth_off_logs_a_loud_warning(settings_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    from api.app import create_app

    with caplog.at_level(logging.WARNING, logger="api.app"):
        create_app(settings_factory(auth="off"))
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)


def test_an_ordinary_progressive_jpeg_is_accepted() -> None:
    import io

    from PIL import Image

    from shared.imagecheck import inspect_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG", progressive=True)
    assert buf.getvalue().count(b"\xff\xda") > 1  # really progressive: several scans
    assert inspect_image(buf.getvalue(), max_bytes=10**6, max_pixels=10**6).format == "JPEG"


def test_admission_refuses_past_its_limit() -> None:
    from api.offload import Admission
    from shared.errors import ServiceUnavailable

    admission = Admission(2)
    admission.enter()
    admission.enter()
    with pytest.raises(ServiceUnavailable) as err:
        admission.enter()
    assert err.value.code == "busy" and err.value.retry_after_s > 0
    admission.leave()
    admission.enter()  # a slot came back


def test_auth_off_serves_loopback_clients_only(settings_factory: Any) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings_factory(auth="off"))
    assert TestClient(app, client=("127.0.0.1", 5000)).get("/v1/jobs").status_code == 200
    for host in ("203.0.113.9", "unknown", "_hidden"):  # forwarded-for forms a proxy may pass on
        r = TestClient(app, client=(host, 5000)).get("/v1/jobs")
        assert r.status_code == 401 and r.json()["error"]["code"] == "auth_off_remote", host
