"""The tenant commands: ``keys`` (create, list, revoke, rotate) and ``tenants`` (limits).

Every image has them (none imports torch). Each handler imports what it needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from shared.settings import get_settings

SUMMARY = {
    "keys": "manage API keys",
}


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    """Add the tenant commands (or those in ``names``) to an argparse subparsers object."""
    adders = {"keys": _add_keys}
    for name in SUMMARY if names is None else names:
        adders[name](subparsers)


def _add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help=SUMMARY["keys"])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", help="create a key (and the tenant); printed once")
    p.add_argument("--tenant", required=True, help="tenant name")
    p.set_defaults(func=cmd_keys_create)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from shared.db import session_scope
    from shared.migrate import upgrade
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
