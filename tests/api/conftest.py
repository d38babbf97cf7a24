"""Fixtures for the API tests: an app on SQLite or PostgreSQL, a fake publisher, API keys, images, and
the app served over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from shared.settings import Settings
from tests.support.apps import Api, build_api
from tests.support.images import EXAMPLES
from tests.support.servers import free_port
from tests.support.waiting import wait_for


@pytest.fixture
def api(settings_factory: Callable[..., Settings]) -> Iterator[Api]:
    """The app on the embedded default (SQLite + folder storage) with a fake publisher."""
    yield build_api(settings_factory())


@pytest.fixture
def pg_api(settings_factory: Callable[..., Settings], pg_url: str) -> Iterator[Api]:
    """The app on the real PostgreSQL (tables emptied per test) with a fake publisher."""
    yield build_api(settings_factory(database_url=pg_url))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_api(request: pytest.FixtureRequest) -> Api:
    """Both databases."""
    chosen: Api = request.getfixturevalue("api" if request.param == "sqlite" else "pg_api")
    return chosen


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture
def serve_api(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., tuple[str, Api]]]:
    """``serve_api(**settings)``: the app (``build_api``) on a free port of 127.0.0.1, served by
    uvicorn in a thread; (its URL, the Api). Stopped after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> tuple[str, Api]:
        api = build_api(settings_factory(**overrides))
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, 10, "the server", interval=0.01)
        return f"http://127.0.0.1:{port}", api

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)
