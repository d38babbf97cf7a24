"""The tenant commands: ``keys`` (create, list, revoke, rotate) and ``tenants`` (set-limits, show).

Every image has them (none imports torch). Each handler imports what it needs. A refusal (unknown
tenant or prefix, an ambiguous prefix, a bad value) prints its message on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.tenants import NewKey

SUMMARY = {
    "keys": "manage API keys: create, list, revoke, rotate",
    "tenants": "per-tenant limits: set-limits, show",
}


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    """Add the tenant commands (or those in ``names``) to an argparse subparsers object."""
    adders = {"keys": _add_keys, "tenants": _add_tenants}
    for name in SUMMARY if names is None else names:
        adders[name](subparsers)


def _days(text: str) -> timedelta:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < days <= 36500:
        raise argparse.ArgumentTypeError("the expiry must be more than 0 and at most 36500 days")
    return timedelta(days=days)


def _add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help=SUMMARY["keys"])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", help="create a key (and the tenant); printed once")
    p.add_argument("--tenant", required=True, help="tenant name")
    p.add_argument("--expires-in", type=_days, metavar="DAYS", help="the key stops working after DAYS")
    p.set_defaults(func=cmd_keys_create)
    p = keys_sub.add_parser("list", help="prefix, tenant, created, last used, expires, revoked (no secret)")
    p.add_argument("--tenant", help="only this tenant's keys")
    p.set_defaults(func=cmd_keys_list)
    p = keys_sub.add_parser("revoke", help="revoke a key at once")
    p.add_argument("prefix", help="the key's prefix (`keys list`)")
    p.add_argument("--tenant", help="the key's tenant, when the prefix is ambiguous")
    p.set_defaults(func=cmd_keys_revoke)
    p = keys_sub.add_parser("rotate", help="a new key (printed once); the old one works for the overlap")
    p.add_argument("prefix", help="the key's prefix (`keys list`)")
    p.add_argument("--tenant", help="the key's tenant, when the prefix is ambiguous")
    p.add_argument(
        "--overlap",
        type=float,
        metavar="SECONDS",
        help="how long the old key keeps working (default: STYLEQUEUE_KEY_ROTATE_OVERLAP_S)",
    )
    p.add_argument("--expires-in", type=_days, metavar="DAYS", help="the new key stops working after DAYS")
    p.set_defaults(func=cmd_keys_rotate)


def _add_tenants(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help=SUMMARY["tenants"])
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    p = tenants_sub.add_parser(
        "set-limits", help="set a tenant's limits; 'default' goes back to the setting, 0 means no limit"
    )
    p.add_argument("tenant", help="tenant name")
    p.add_argument("--max-queued", metavar="N", help="queued jobs at most (STYLEQUEUE_TENANT_MAX_QUEUED)")
    p.add_argument("--max-running", metavar="N", help="running jobs at most (STYLEQUEUE_TENANT_MAX_RUNNING)")
    p.add_argument(
        "--daily-budget-mpi",
        metavar="N",
        help="megapixel-iterations per UTC day (STYLEQUEUE_TENANT_DAILY_BUDGET_MPI)",
    )
    p.add_argument(
        "--rate-limit",
        metavar="STR",
        help="per key, e.g. '20/second;600/minute', or 'off' (STYLEQUEUE_RATE_LIMIT)",
    )
    p.add_argument("--weight", metavar="N", help="share of the workers relative to other tenants (default 1)")
    p.set_defaults(func=cmd_tenants_set_limits)
    p = tenants_sub.add_parser("show", help="a tenant's limits and today's usage")
    p.add_argument("tenant", help="tenant name")
    p.set_defaults(func=cmd_tenants_show)


@contextmanager
def _session() -> Iterator[Session]:
    from shared.db import session_scope
    from shared.migrate import upgrade

    url = get_settings().database_url
    if url.startswith("sqlite"):
        upgrade(url)
    with session_scope(url) as session:
        yield session


def _run(action: Callable[[Session], None]) -> int:
    """``action`` in one transaction; a refusal (a DomainError) is printed and rolls it back."""
    from shared.errors import DomainError

    try:
        with _session() as session:
            action(session)
    except DomainError as exc:
        print(f"stylequeue: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _when(value: datetime | None) -> str:
    from shared.tenants import aware

    return "-" if value is None else f"{aware(value):%Y-%m-%d %H:%M}Z"


def _print_new_key(new: NewKey) -> None:
    expiry = f"; expires {_when(new.expires_at)}" if new.expires_at is not None else ""
    print(f"tenant {new.tenant_name} ({new.tenant_id}); key prefix {new.prefix}{expiry}")
    print("store this key now, it is not shown again:")
    print(new.key)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from shared.tenants import create_key

    return _run(lambda session: _print_new_key(create_key(session, args.tenant, expires_in=args.expires_in)))


def cmd_keys_list(args: argparse.Namespace) -> int:
    from shared.tenants import list_keys

    def show(session: Session) -> None:
        rows = [("PREFIX", "TENANT", "STATE", "CREATED", "LAST USED", "EXPIRES", "REVOKED")]
        for k in list_keys(session, args.tenant):
            when = (_when(k.created_at), _when(k.last_used_at), _when(k.expires_at), _when(k.revoked_at))
            rows.append((k.prefix, k.tenant, k.state(), *when))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    return _run(show)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from shared.tenants import revoke_key

    def revoke(session: Session) -> None:
        info = revoke_key(session, args.prefix, args.tenant)
        print(f"key {info.prefix} of tenant {info.tenant} revoked at {_when(info.revoked_at)}")

    return _run(revoke)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from shared.tenants import rotate_key

    overlap_s = get_settings().key_rotate_overlap_s if args.overlap is None else args.overlap

    def rotate(session: Session) -> None:
        overlap = timedelta(seconds=overlap_s)
        new, old = rotate_key(
            session, args.prefix, overlap, tenant_name=args.tenant, expires_in=args.expires_in
        )
        print(f"the old key {old.prefix} keeps working until {_when(old.expires_at)}")
        _print_new_key(new)

    return _run(rotate)


def cmd_tenants_set_limits(args: argparse.Namespace) -> int:
    from shared.quotas import LIMIT_FIELDS, set_limits
    from shared.tenants import find_tenant

    changes = {name: getattr(args, name) for name in LIMIT_FIELDS if getattr(args, name) is not None}
    if not changes:
        print("stylequeue: nothing to set: give at least one of the limit options", file=sys.stderr)
        return 2

    def apply(session: Session) -> None:
        tenant = find_tenant(session, args.tenant)
        set_limits(tenant, changes)
        session.flush()
        _print_limits(session, tenant.name)

    return _run(apply)


def cmd_tenants_show(args: argparse.Namespace) -> int:
    return _run(lambda session: _print_limits(session, args.tenant))


def _print_limits(session: Session, name: str) -> None:
    from shared.quotas import effective_limits, queued_count, today, usage_on
    from shared.tenants import find_tenant

    tenant = find_tenant(session, name)
    limits = effective_limits(tenant, get_settings())

    def shown(field: str, value: int | str, unit: str = "") -> str:
        text = (
            (f"{value}{unit}" if value else "no limit") if isinstance(value, int) else (value or "no limit")
        )
        return f"{text} ({'override' if field in limits.overrides else 'setting'})"

    day = today()
    budget = limits.daily_budget_mpi
    print(f"tenant {tenant.name} ({tenant.id})")
    print(f"  weight            {limits.weight}")
    print(f"  rate limit        {shown('rate_limit', limits.rate_limit)}")
    queued = queued_count(session, tenant.id)
    print(f"  max queued        {shown('max_queued', limits.max_queued)}; queued now {queued}")
    print(f"  max running       {shown('max_running', limits.max_running)}")
    print(f"  daily budget      {shown('daily_budget_mpi', budget, ' MPI')}")
    used = usage_on(session, tenant.id, day)
    left = f"; {max(0, budget - used)} left" if budget else ""
    print(f"  used today        {used} MPI ({day.isoformat()} UTC){left}")
