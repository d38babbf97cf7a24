"""``live_api``: one real ``stylequeue api`` process (uvicorn) for the whole session, to attack.

It runs on 127.0.0.1 with ``STYLEQUEUE_AUTH=on``, a throwaway PostgreSQL database of its own
(migrated), this session's Redis DB index as the broker (accepted jobs only queue: no worker runs)
and folder storage in a tmp folder. Without PostgreSQL or Redis the tests skip (and fail under
``CI=true``). The object is a :class:`tests.support.live.LiveApi`::

    def test_x(live_api):
        before = live_api.counts()   # {"jobs", "batches", "images", "tenant_images",
                                     #  "idempotency_keys", "objects"} -> int
        mark = live_api.log_size()
        with live_api.client() as c:  # tenant A's key; client("b"), client(None), client("sq_x")
            r = c.get(f"/v1/jobs/{live_api.job_id}")
        assert r.status_code < 500, (live_api.errors_since(mark), live_api.log_tail())
        assert live_api.counts() == before

Attributes: ``base_url``, ``key_a``, ``key_b``, ``tenant_a``, ``tenant_b``, ``image_ids`` (A's,
``content_id`` / ``style_id`` are the first two), ``image_b`` (B's only), ``job_id`` and
``batch_id`` (A's, queued). A test that may freeze the API calls ``live_api.ensure_alive()``
afterwards (it SIGKILLs and restarts it when ``/healthz`` does not answer).

When a test fails, the tail of the API log is appended to its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.live import LiveApi, running_api
from tests.support.servers import REDIS_HOST, REDIS_PORT, port_open, require, temporary_database

_LIVE: list[LiveApi] = []


@pytest.fixture(scope="session")
def live_api(tmp_path_factory: pytest.TempPathFactory, _redis_db: int) -> Iterator[LiveApi]:
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    tmp = tmp_path_factory.mktemp("hostile-api")
    with (
        temporary_database("sq_hostile") as url,
        running_api(tmp, url, f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}") as api,
    ):
        _LIVE.append(api)
        try:
            yield api
        finally:
            _LIVE.remove(api)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    if report.failed and _LIVE and "live_api" in getattr(item, "fixturenames", ()):
        report.sections.append(("stylequeue api log", _LIVE[-1].log_tail(80)))
    return report
