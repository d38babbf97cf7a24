"""Fixtures for the real servers the tests use (see ../shared/docs/services.md).

PostgreSQL and Redis run on 127.0.0.1 on developers' machines and on CI. A test that needs one skips
with a reason when it is unreachable, and fails instead under ``CI=true``. S3 is moto's threaded
server: a real HTTP endpoint on 127.0.0.1 for boto3.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, get_settings
from tests.net import port_open
from tests.pgdb import temporary_database

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"


def require(ok: bool, reason: str) -> None:
    """Skip when a server is missing on a developer machine; fail on CI, where it must be there."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: servers must be available)")
    pytest.skip(reason)


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


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    bucket: str

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/stylequeue"


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
        for key in [k for k in os.environ if k.startswith("STYLEQUEUE_")]:
            monkeypatch.delenv(key)
        for key, value in overrides.items():
            if value is not None:
                monkeypatch.setenv(f"STYLEQUEUE_{key.upper()}", str(value))
        get_settings.cache_clear()
        return get_settings()

    yield make
    get_settings.cache_clear()
