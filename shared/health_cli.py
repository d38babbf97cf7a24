"""``stylequeue health ROLE``: the container health checks, one per service, exit 0 when healthy.

- ``api``: ``GET /healthz`` on this container's port answers 200.
- ``worker``: every Celery worker this host runs has registered itself ``healthy`` (weights loaded,
  consuming) and beat within ``lease_s``: the workers' own report, read from the ``workers`` table.
- ``dispatcher``: its loop finished a pass recently (it touches a file in the temp folder per pass).
- ``webhooks``: the webhook Celery worker of this host answers a broker ping.

Each prints one line saying why when unhealthy (``docker inspect`` shows it) and is bounded by a
timeout: a health check that hangs is itself a failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.settings import Settings, get_settings

SUMMARY = {"health": "container health check: api | worker | dispatcher | webhooks (exit 0 = healthy)"}

ROLES = ("api", "worker", "dispatcher", "webhooks")
TIMEOUT_S = 5.0


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    p = subparsers.add_parser("health", help=SUMMARY["health"])
    p.add_argument("role", choices=ROLES)
    p.set_defaults(func=cmd_health)


def beat_file(role: str) -> Path:
    """Where a long-running loop (the dispatcher) records that it is alive: touched once per pass."""
    return Path(tempfile.gettempdir()) / f"stylequeue-{role}.alive"


def touch_beat(role: str) -> None:
    path = beat_file(role)
    path.touch(exist_ok=True)
    os.utime(path)


def check_api(settings: Settings) -> str | None:
    import httpx

    url = f"http://127.0.0.1:{settings.api_port}/healthz"
    try:
        resp = httpx.get(url, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{url}: {exc}"
    return None if resp.status_code == 200 else f"{url} answered {resp.status_code}"


def check_worker(settings: Settings) -> str | None:
    from datetime import datetime, timezone

    from sqlalchemy import select

    from shared.db import get_sessionmaker
    from shared.models import Worker
    from shared.workers import WorkerStatus

    host = socket.gethostname()
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.scalars(select(Worker).where(Worker.host == host)).all()
        if not rows:
            return f"no worker of host {host} has registered"
        now = datetime.now(timezone.utc)
        for row in rows:
            beat = row.heartbeat_at.replace(tzinfo=row.heartbeat_at.tzinfo or timezone.utc)
            age = (now - beat).total_seconds()
            if row.status != str(WorkerStatus.HEALTHY):
                return f"{row.id} is {row.status}: {row.detail or 'no detail'}"
            if age > settings.lease_s:
                return f"{row.id}: no heartbeat for {age:.0f}s (lease {settings.lease_s:.0f}s)"
    return None


def check_dispatcher(settings: Settings) -> str | None:
    path = beat_file("dispatcher")
    limit = max(60.0, 5 * settings.dispatch_interval_s)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return f"no pass finished yet ({path} is missing)"
    return None if age <= limit else f"last pass finished {age:.0f}s ago (limit {limit:.0f}s)"


def check_webhooks(settings: Settings) -> str | None:
    from shared.queue import make_celery

    node = f"webhooks@{socket.gethostname()}"
    app = make_celery(settings)
    try:
        replies = app.control.ping(destination=[node], timeout=TIMEOUT_S / 2)
    finally:
        app.close()
    return None if replies else f"{node} did not answer a ping"


CHECKS = {
    "api": check_api,
    "worker": check_worker,
    "dispatcher": check_dispatcher,
    "webhooks": check_webhooks,
}


def cmd_health(args: argparse.Namespace) -> int:
    try:
        problem = CHECKS[args.role](get_settings())
    except Exception as exc:  # noqa: BLE001 - a health check reports any failure as unhealthy
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0
