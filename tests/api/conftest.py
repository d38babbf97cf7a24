"""Fixtures for the API tests: an app on SQLite or PostgreSQL, a fake publisher, API keys, images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.support.apps import Api, build_api
from tests.support.images import EXAMPLES


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
