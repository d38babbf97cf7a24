"""The server commands: ``api``, ``migrate``, ``worker``, ``dispatch`` and ``webhooks`` (``keys``:
shared/tenant_cli.py).

Every image has them (the API image too: none imports torch). Each handler imports what it needs
(uvicorn, SQLAlchemy, Celery, ``worker.supervisor``) so ``stylequeue --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2

SUMMARY = {
    "api": "run the HTTP API (uvicorn)",
    "migrate": "create or upgrade the database schema",
    "worker": "run GPU workers (one Celery worker per GPU)",
    "dispatch": "publish queued jobs fairly into free worker slots; recover lost ones; purge expired",
    "reconcile": "the same as dispatch (its former name)",
    "webhooks": "deliver webhook events (a Celery worker of the webhook queue; no GPU, no torch)",
}


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    """Add the server commands (or those in ``names``) to an argparse subparsers object."""
    adders = {
        "api": _add_api,
        "migrate": _add_migrate,
        "worker": _add_worker,
        "dispatch": _add_dispatch,
        "reconcile": _add_dispatch,
        "webhooks": _add_webhooks,
    }
    for name in SUMMARY if names is None else names:
        if adders[name] is _add_dispatch:
            _add_dispatch(subparsers, name)
        else:
            adders[name](subparsers)


def _add_api(sub: Any) -> None:
    p = sub.add_parser("api", help=SUMMARY["api"])
    p.add_argument("--host", default=None, help="default: STYLEQUEUE_API_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: STYLEQUEUE_API_PORT or 8000")
    p.set_defaults(func=cmd_api)


def _add_migrate(sub: Any) -> None:
    p = sub.add_parser("migrate", help=SUMMARY["migrate"])
    p.set_defaults(func=cmd_migrate)


def _add_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help=SUMMARY["worker"])
    p.add_argument("--gpus", help="comma-separated GPU indices (default: every visible GPU)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="pool processes per worker, so per GPU (default 1; 2-4 under CUDA MPS, see README)",
    )
    p.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    p.add_argument("--cpu", action="store_true", help="one CPU worker even if GPUs are present")
    p.set_defaults(func=cmd_worker)


def _add_dispatch(sub: Any, name: str = "dispatch") -> None:
    r = sub.add_parser(name, help=SUMMARY[name])
    r.add_argument("--once", action="store_true", help="one pass, then exit")
    r.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds between passes (default STYLEQUEUE_DISPATCH_INTERVAL_S)",
    )
    r.set_defaults(func=cmd_dispatch)


def _add_webhooks(sub: Any) -> None:
    p = sub.add_parser("webhooks", help=SUMMARY["webhooks"])
    p.add_argument("--loglevel", default="info", help="Celery log level (default info)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="deliveries at once (default STYLEQUEUE_WEBHOOK_CONCURRENCY)",
    )
    p.set_defaults(func=cmd_webhooks)


def cmd_webhooks(args: argparse.Namespace) -> int:
    """A Celery worker of the webhook queue only, in threads (deliveries wait on the network)."""
    import socket

    from api.webhook_task import app
    from shared.queue import webhook_queue

    settings = get_settings()
    if settings.embedded:
        prepare_embedded(settings)
    app.worker_main(
        [
            "worker",
            "-P",
            "threads",
            "-c",
            str(max(1, args.concurrency or settings.webhook_concurrency)),
            "-Q",
            webhook_queue(settings),
            "-n",
            f"webhooks@{socket.gethostname()}",
            "--loglevel",
            args.loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    host = args.host or settings.api_host
    if settings.auth == "off" and not _loopback(host) and not settings.auth_off_allow_remote:
        raise SystemExit(
            f"refusing to serve {host} with STYLEQUEUE_AUTH=off: anyone who can reach it would act "
            "as the local tenant. Bind 127.0.0.1, turn auth on, or set "
            "STYLEQUEUE_AUTH_OFF_ALLOW_REMOTE=true if something in front authenticates."
        )
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=args.port or settings.api_port,
        proxy_headers=True,
    )
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is up to date")
    return 0


def prepare_embedded(settings: Settings) -> None:
    """On the embedded default: create the data folder and bring the database schema up to date."""
    settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)
    if settings.database_url.startswith("sqlite"):
        from shared.migrate import upgrade

        upgrade(settings.database_url)


def cmd_worker(args: argparse.Namespace) -> int:
    """Check the settings, then run one Celery worker per GPU under ``worker.supervisor``."""
    from worker import supervisor

    settings = get_settings()
    problem = supervisor.config_problem(settings)
    if problem:
        print(f"stylequeue worker: refusing to start: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if settings.embedded:
        prepare_embedded(settings)
    return supervisor.start(args, settings)


def cmd_dispatch(args: argparse.Namespace) -> int:
    """The dispatcher loop (``shared.dispatcher``); several may run at once."""
    from shared.db import get_sessionmaker
    from shared.dispatcher import one_pass, run_forever
    from shared.health_cli import touch_beat
    from shared.queue import make_celery, publish_many, webhook_queue

    settings = get_settings()
    if settings.embedded:
        prepare_embedded(settings)
    app = make_celery(settings)
    sessions = get_sessionmaker(settings.database_url)

    def publish(job_ids: Sequence[str]) -> list[str]:
        return publish_many(app, job_ids)

    def publish_webhooks(event_ids: Sequence[str]) -> list[str]:
        return publish_many(app, event_ids, webhooks_to=webhook_queue(settings))

    housekeeping = _housekeeping(settings, sessions)
    if args.once:
        report = one_pass(sessions, publish, settings, housekeeping, publish_webhooks=publish_webhooks)
        r = report.reconciled
        print(
            f"lost={len(r.lost)} requeued={len(r.requeued)} failed={len(r.failed)} "
            f"dispatched={len(report.dispatched.published)}"
        )
        return 0
    if settings.dispatcher_metrics_port:  # the database gauges: this process only, not the API's
        from shared.metrics import serve_dispatcher_metrics

        port, token = settings.dispatcher_metrics_port, settings.metrics_token
        serve_dispatcher_metrics(sessions, port=port, token=token, lease_s=settings.lease_s)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    logger.info(
        "dispatcher: every %.1fs, lease %.0fs, publish grace %.0fs, %d message(s) ahead per slot",
        args.interval or settings.dispatch_interval_s,
        settings.lease_s,
        settings.publish_grace_s,
        settings.dispatch_ahead,
    )
    run_forever(
        sessions,
        publish,
        settings,
        housekeeping=housekeeping,
        interval_s=args.interval,
        stop=lambda: bool(stopping),
        publish_webhooks=publish_webhooks,
        on_pass=lambda: touch_beat("dispatcher"),
    )
    return 0


def _housekeeping(settings: Settings, sessions: Any) -> Any:
    """The retention step of each pass (``shared.orphans.Housekeeping``)."""
    from shared.orphans import Housekeeping
    from shared.storage import open_storage

    return Housekeeping(sessions, open_storage(settings), settings)
