"""CLI subcommands of the API side: ``api``, ``migrate``, ``keys create``, ``submit``, ``status``.

FastAPI, uvicorn and httpx are imported inside the handlers so ``stylequeue --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("api", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", default=None, help="default: STYLEQUEUE_API_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: STYLEQUEUE_API_PORT or 8000")
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("migrate", help="create or upgrade the database schema")
    p.set_defaults(func=cmd_migrate)

    keys = subparsers.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", help="create a key (and the tenant); printed once")
    p.add_argument("--tenant", required=True, help="tenant name")
    p.set_defaults(func=cmd_keys_create)

    p = subparsers.add_parser("submit", help="submit contents x styles over HTTP")
    p.add_argument("contents", nargs="+", metavar="CONTENT", help="content image files")
    p.add_argument("--style", action="append", required=True, help="style image (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="engine parameter, V parsed as JSON when it can be (repeatable)")
    p.add_argument("--mode", choices=["product", "pairs"], default="product",
                   help="product: every content x every style; pairs: content i with style i")
    p.add_argument("--wait", action="store_true", help="show progress, then download results")
    p.add_argument("-o", "--output", default="stylequeue-out", help="folder for results")
    _client_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="show a job or a batch")
    p.add_argument("id", metavar="JOB_OR_BATCH")
    _client_args(p)
    p.set_defaults(func=cmd_status)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("STYLEQUEUE_URL", "http://127.0.0.1:8000"),
                   help="API base URL (env STYLEQUEUE_URL)")
    p.add_argument("--key", default=os.environ.get("STYLEQUEUE_API_KEY"),
                   help="API key (env STYLEQUEUE_API_KEY)")


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from shared.settings import get_settings

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
    from shared.settings import get_settings

    upgrade(get_settings().database_url)
    print("database is up to date")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from shared.db import session_scope
    from shared.migrate import upgrade
    from shared.settings import get_settings
    from shared.tenants import create_key

    url = get_settings().database_url
    if url.startswith("sqlite"):
        upgrade(url)
    with session_scope(url) as session:
        new = create_key(session, args.tenant)
    print(f"tenant {new.tenant_name} ({new.tenant_id}); key prefix {new.prefix}")
    print("store this key now, it is not shown again:")
    print(new.key)
    return 0


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects K=V, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def cmd_submit(args: argparse.Namespace) -> int:
    from api.clicmds import submit

    return submit(args, parse_params(args.param))


def cmd_status(args: argparse.Namespace) -> int:
    from api.clicmds import status

    return status(args)
