"""Liveness (``/healthz``) and readiness (``/readyz``: database, broker and storage reachable).

``/readyz`` also counts the registered workers (``workers``: healthy, unhealthy), for information only:
the API is ready without any worker (jobs wait in the queue until one registers), so its status never
depends on them. A probe that fails says only ``down``; what failed is in the log.

Both are unauthenticated, so a flood of them must cost nothing the tenants need: ``/healthz`` touches
nothing, and ``/readyz`` answers from the last probe for ``READY_CACHE_S``. One probe runs at a time
(in the threadpool); callers that arrive meanwhile wait for it on the event loop, holding no thread
and no connection. However many probes arrive, the database, the broker and the storage see at most
one round per second per API process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
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
READY_CACHE_S = 1.0  # a /readyz answer is reused this long (a flood probes at most once a second)


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


@dataclass
class ReadyCache:
    """The last readiness answer, and the lock that lets one probe run at a time. An asyncio lock
    belongs to one event loop: a new loop (a test client's) gets a new lock, the answer is kept."""

    at: float = float("-inf")
    answer: tuple[int, dict[str, Any]] = (503, {})
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loop: asyncio.AbstractEventLoop | None = None

    def fresh(self) -> bool:
        return time.monotonic() - self.at < READY_CACHE_S

    def lock_here(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.lock, self.loop = asyncio.Lock(), loop
        return self.lock


def _cache(request: Request) -> ReadyCache:
    cache: ReadyCache | None = getattr(request.app.state, "ready_cache", None)
    if cache is None:
        cache = request.app.state.ready_cache = ReadyCache()
    return cache


def _ready(state: Any) -> tuple[int, dict[str, Any]]:
    checks = {
        "database": _probe("database", lambda: _db_ping(state.settings.database_url)),
        "broker": _probe("broker", state.publisher.check),
        "storage": _probe("storage", state.storage.check),
    }
    down = sorted(k for k, v in checks.items() if v != "ok")
    fleet = _workers(state.settings) if checks["database"] == "ok" else None
    if not down:
        return 200, {"status": "ready", "checks": checks, "workers": fleet}
    body = error_body("not_ready", f"unreachable: {', '.join(down)}")
    return 503, {**body, "status": "not_ready", "checks": checks, "workers": fleet}


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut}},
    summary="Database, broker and storage reachable (200) or not (503); at most 1 s old",
)
async def readyz(request: Request) -> JSONResponse:
    cache = _cache(request)
    if not cache.fresh():
        async with cache.lock_here():
            if not cache.fresh():  # the probe that ran while this one waited may have answered
                cache.answer = await anyio.to_thread.run_sync(_ready, request.app.state)
                cache.at = time.monotonic()
    status, body = cache.answer
    headers = {"Retry-After": str(READY_RETRY_AFTER_S)} if status != 200 else None
    return JSONResponse(body, status_code=status, headers=headers)
