"""Fixtures for the real servers the tests use (see ../shared/docs/services.md); the helpers
behind them are in tests/support.

PostgreSQL and Redis run on 127.0.0.1 on developers' machines and on CI. A test that needs one skips
with a reason when it is unreachable, and fails instead under ``CI=true``. S3 is moto's threaded
server: a real HTTP endpoint on 127.0.0.1 for boto3.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, get_settings
from tests.support.images import EXAMPLES
from tests.support.servers import REDIS_HOST, REDIS_PORT, S3Endpoint, port_open, require, temporary_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    with temporary_database("sq_test") as url:
        yield url


@pytest.fixture(scope="session")
def _redis_db() -> int:
    require(port_open(REDIS_HOST, REDIS_PORT), "Redis is not reachable on 127.0.0.1:6379")
    # A DB index per session so two runs on one machine don't flush each other's keys.
    return 1 + uuid.uuid4().int % 15


@pytest.fixture
def redis_url(_redis_db: int) -> str:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=_redis_db)
    client.flushdb()
    client.close()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stylequeue.db'}"


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(_moto_server: str) -> S3Endpoint:
    """A new bucket on the moto server for each test."""
    import boto3

    bucket = f"sq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return S3Endpoint(endpoint_url=_moto_server, bucket=bucket)


@pytest.fixture
def settings_factory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Build Settings from STYLEQUEUE_* env overrides; ``get_settings()`` then returns the same."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("rate_limit", "")  # tests make requests fast; rate-limit tests set one
        for key in [k for k in os.environ if k.startswith("STYLEQUEUE_")]:
            monkeypatch.delenv(key)
        for key, value in overrides.items():
            if value is not None:
                monkeypatch.setenv(f"STYLEQUEUE_{key.upper()}", str(value))
        get_settings.cache_clear()
        return get_settings()

    yield make
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """Small inputs (64 px) made from the example images (the integration and fault tests)."""
    import io

    from PIL import Image

    out = {}
    folder = EXAMPLES
    for name in ("content_astronaut.png", "content_chelsea_cat.png", "style_hokusai_great_wave.jpg"):
        im = Image.open(folder / name).convert("RGB")
        im.thumbnail((64, 64))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out[name.split(".")[0]] = buf.getvalue()
    return out
