"""Real processes for the integration tests (tests/support/stacks.py): worker and API subprocesses.

One worker and one API per backend per module (starting torch takes seconds); tests isolate by using
their own jobs and waiting for each to end. Two backends:

* ``server_stack``: PostgreSQL + Redis + moto S3 (skips without the servers; fails under CI=true);
* ``embedded_stack``: nothing but a fresh data folder (SQLite, kombu's SQL transport, a folder). The
  worker starts first, on an empty folder: it must create it and migrate the database itself.

Workers run with ``STYLEQUEUE_WEIGHTS=random`` on the CPU, tiny images and few iterations.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.servers import REDIS_HOST, REDIS_PORT
from tests.support.stacks import Stack, make_key, stack_env, stack_settings


@pytest.fixture(scope="module")
def server_stack(
    pg_url: str, _redis_db: int, _moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    import boto3

    from shared.migrate import upgrade

    tmp = tmp_path_factory.mktemp("server-stack")
    bucket = f"sq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    env = stack_env(
        tmp,
        database_url=pg_url,
        broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}",
        storage_url=f"s3://{bucket}/sq",
        s3_endpoint_url=_moto_server,
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env[name] = os.environ[name]
    stack = Stack("server", env, stack_settings(env), tmp)
    upgrade(stack.settings.database_url)
    try:
        stack.start_worker("--concurrency", "2")
        stack.start_api()
        stack.key = make_key(stack.settings)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("embedded-stack")
    env = stack_env(tmp)
    stack = Stack("embedded", env, stack_settings(env), tmp)
    assert not stack.settings.data_dir.exists()
    try:
        stack.start_worker()  # creates the data folder and migrates the database
        stack.start_api()
        stack.key = make_key(stack.settings)
        yield stack
    finally:
        stack.close()
