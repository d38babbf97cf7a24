"""Fixtures of the web page's tests: the in-process app (SQLite, folder storage, a fake publisher) and a
signed-in browser-like client (``tests/web/webclient.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.settings import Settings
from tests.support.apps import Api, build_api
from tests.web.webclient import Browser, browser


@pytest.fixture
def api(settings_factory: Callable[..., Settings]) -> Api:
    return build_api(settings_factory())


@pytest.fixture
def web(api: Api) -> Browser:
    """Signed in as the app's first tenant (``alice``)."""
    signed_in = browser(api)
    signed_in.sign_in()
    return signed_in
