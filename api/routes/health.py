"""Liveness (``/healthz``) and readiness (``/readyz``: database, broker and storage reachable).

``/readyz`` also counts the registered workers (``workers``: healthy, unhealthy), for information only:
the API is ready without any worker (jobs wait in the queue until one registers), so its status never
depends on them. A probe that fails says only ``down``; what failed is in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.errors import error_body
from api.schemas import ReadyOut
from shared import logs, workers
from shared.db import get_engine, get_sessionmaker
from shared.models import utcnow
from shared.settings import Settings

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
        return "down"  # not the exception's name: the log keeps the detail (security review item 11)
    return "ok"


def _db_ping(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _workers(settings: Settings) -> dict[str, int] | None:
    """Healthy and unhealthy workers, or None when the database cannot say (logged)."""
    try:
        with get_sessionmaker(settings.database_url)() as session:
            found = workers.summary(session, now=utcnow(), lease_s=settings.lease_s)
    except Exception as exc:  # noqa: BLE001 - informational: the database probe reports the outage
        logs.event(logger, "workers_unknown", kind="ready", level=logging.WARNING, error=repr(exc))
        return None
    return {"healthy": found.healthy, "unhealthy": found.unhealthy}


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
    fleet = _workers(state.settings) if checks["database"] == "ok" else None
    if not down:
        return JSONResponse({"status": "ready", "checks": checks, "workers": fleet})
    body = error_body("not_ready", f"unreachable: {', '.join(down)}")
    return JSONResponse(
        {**body, "status": "not_ready", "checks": checks, "workers": fleet},
        status_code=503,
        headers={"Retry-After": str(READY_RETRY_AFTER_S)},
    )
