"""Liveness (``/healthz``) and readiness (``/readyz``: database, broker and storage reachable)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.errors import error_body
from api.schemas import ReadyOut
from shared import logs
from shared.db import get_engine

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

READY_RETRY_AFTER_S = 5


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:  # on the event loop itself: it measures the loop
    return {"status": "ok"}


def _probe(name: str, fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - any failure of a probe means that dependency is down
        logs.event(logger, "down", kind="ready", level=logging.WARNING, dependency=name, error=repr(exc))
        return f"down: {type(exc).__name__}"
    return "ok"


def _db_ping(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut}},
    summary="Database, broker and storage reachable (200) or not (503)",
)
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks = {
        "database": _probe("database", lambda: _db_ping(state.settings.database_url)),
        "broker": _probe("broker", state.publisher.check),
        "storage": _probe("storage", state.storage.check),
    }
    down = sorted(k for k, v in checks.items() if v != "ok")
    if not down:
        return JSONResponse({"status": "ready", "checks": checks})
    body = error_body("not_ready", f"unreachable: {', '.join(down)}")
    return JSONResponse(
        {**body, "status": "not_ready", "checks": checks},
        status_code=503,
        headers={"Retry-After": str(READY_RETRY_AFTER_S)},
    )
