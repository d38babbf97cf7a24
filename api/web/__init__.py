"""The web page, served by the API under ``/web`` (no build step, no torch): sign in with an API key,
submit batches, watch them run, look at and download the results. Jinja2 templates and a little
hand-written JavaScript (``static/``); the routes reuse the API's own submission, cancel, delete and
live-event code for the signed-in tenant (``api.web.auth`` has the session and CSRF scheme).

``api.app.create_app`` includes ``router`` and mounts ``static_files()`` at ``STATIC_PATH``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.staticfiles import StaticFiles

from api.web import actions, files, pages
from api.web.render import HERE

STATIC_PATH = "/web/static"

router = APIRouter()
for _module in (pages, actions, files):
    router.include_router(_module.router)


def static_files() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")


__all__ = ["STATIC_PATH", "router", "static_files"]
