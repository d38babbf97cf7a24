"""Per-tenant quotas checked when jobs are submitted: queued jobs and a daily compute budget; and the
per-tenant limits (``stylequeue tenants set-limits`` / ``show``).

``admit`` runs inside the submission's transaction, before anything is written (images, batch, jobs):
a refusal raises and the transaction is rolled back, so a refused submission creates nothing.

* **Queued jobs**: the tenant's queued jobs (not deleted) plus the new ones must stay within
  ``max_queued`` (the tenant's override, else ``STYLEQUEUE_TENANT_MAX_QUEUED``; 0 = no limit).
  Over it: 429 ``tenant_queue_full`` with ``Retry-After``; a submission that alone has more jobs than
  the limit: 403 ``submission_exceeds_queue_limit`` (waiting would not help).
* **Daily compute**: ``tenant_usage`` keeps, per tenant and UTC day, the megapixel-iterations (MPI)
  submitted; a submission is charged ``ceil(sum(costs) / 1e6)``. Over the budget (override, else
  ``STYLEQUEUE_TENANT_DAILY_BUDGET_MPI``; 0 = no limit): 429 ``daily_budget_exceeded`` with
  ``Retry-After`` until the next UTC midnight; a submission larger than the whole budget: 403
  ``job_exceeds_daily_budget``. Usage is charged even without a budget, and kept when jobs are
  deleted or fail (submitting is what is charged).

Atomicity: on PostgreSQL the tenant row is locked (``SELECT ... FOR NO KEY UPDATE``, which does not
block inserts referencing the tenant) for the rest of the submission's transaction, so a tenant's
submissions are admitted one at a time; ``api.submission`` admits before it stores a form's new
images (so that a refusal stores nothing), so the lock also spans those writes. Other tenants never
wait. The charge itself is a conditional ``UPDATE ... SET mpi = mpi + :n WHERE mpi + :n <= :budget``
after an insert-if-absent: two submissions can never both spend the last of a budget, lock or not.
SQLite serialises writers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared import logs
from shared.errors import Forbidden, InvalidInput, TooManyRequests
from shared.jobs import JobStatus
from shared.models import Job, Tenant, TenantUsage, utcnow
from shared.settings import Settings

if TYPE_CHECKING:
    from limits import RateLimitItem

logger = logging.getLogger(__name__)

MPI = 1_000_000  # pixel-iterations in a megapixel-iteration
QUEUE_FULL_RETRY_S = 60  # Retry-After of tenant_queue_full: the time for some queued jobs to finish
DEFAULT = "default"  # ``tenants set-limits --X default``: back to the setting
OFF = "off"  # ``--rate-limit off``: no rate limit for this tenant (stored as "")
LIMIT_FIELDS = ("max_queued", "max_running", "daily_budget_mpi", "rate_limit", "weight")


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits (0 = none), and which of them are overrides."""

    max_queued: int
    max_running: int
    daily_budget_mpi: int
    rate_limit: str  # "" = no rate limit
    weight: int
    overrides: frozenset[str]


def effective_limits(tenant: Tenant, settings: Settings) -> Limits:
    """The tenant's override where it has one (not NULL), else the setting."""
    overrides = frozenset(name for name in LIMIT_FIELDS[:4] if getattr(tenant, name) is not None)
    return Limits(
        max_queued=settings.tenant_max_queued if tenant.max_queued is None else tenant.max_queued,
        max_running=settings.tenant_max_running if tenant.max_running is None else tenant.max_running,
        daily_budget_mpi=(
            settings.tenant_daily_budget_mpi if tenant.daily_budget_mpi is None else tenant.daily_budget_mpi
        ),
        rate_limit=settings.rate_limit if tenant.rate_limit is None else tenant.rate_limit,
        weight=tenant.weight,
        overrides=overrides,
    )


def parse_rate_limit(text: str) -> list[RateLimitItem]:
    """``"20/second;600/minute"`` as the limits library's items ([] for "", no limit); ValueError
    when it is not the library's syntax."""
    from limits import parse_many

    return parse_many(text) if text.strip() else []


def _limit_value(name: str, raw: str) -> int | str | None:
    """A ``set-limits`` value as stored: None for ``default`` (weight: 1), else validated."""
    raw = raw.strip()
    if raw.lower() == DEFAULT:
        return 1 if name == "weight" else None
    if name == "rate_limit":
        text = "" if raw.lower() == OFF else raw
        try:
            parse_rate_limit(text)
        except ValueError:
            raise InvalidInput(
                "invalid_rate_limit",
                f"{raw!r} is not a rate limit: write e.g. '20/second;600/minute', 'off' or 'default'",
            ) from None
        return text
    lowest = 1 if name == "weight" else 0
    if not raw.isdigit() or int(raw) < lowest:
        raise InvalidInput(
            "invalid_limit", f"--{name.replace('_', '-')} must be an integer >= {lowest} or 'default'"
        )
    return int(raw)


def set_limits(tenant: Tenant, changes: Mapping[str, str]) -> None:
    """Set the tenant's overrides from ``set-limits`` values (all validated before any is set);
    the caller commits."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidInput("invalid_limit", f"unknown limits: {', '.join(sorted(unknown))}")
    values = {name: _limit_value(name, raw) for name, raw in changes.items()}
    for name, value in values.items():
        setattr(tenant, name, value)
    changed = " ".join(
        f"{name}={'default' if value is None else repr(value)}" for name, value in values.items()
    )
    logs.event(logger, "limits_set", kind="tenant", tenant_id=tenant.id, changes=changed)


def charge_of(costs: Sequence[int]) -> int:
    """What a submission costs the daily budget: its pixel-iterations in MPI, rounded up."""
    return math.ceil(sum(costs) / MPI)


def today() -> date:
    return utcnow().date()


def seconds_to_midnight(now: datetime | None = None) -> int:
    """Whole seconds (>= 1) until the next UTC midnight, when a fresh daily budget starts."""
    now = now or utcnow()
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
    return max(1, math.ceil((midnight - now).total_seconds()))


def usage_on(session: Session, tenant_id: str, day: date) -> int:
    used = session.scalar(
        select(TenantUsage.mpi).where(TenantUsage.tenant_id == tenant_id, TenantUsage.day == day)
    )
    return int(used or 0)


def queued_count(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job)
    query = query.where(Job.tenant_id == tenant_id, Job.status == JobStatus.QUEUED, Job.deleted_at.is_(None))
    return int(session.scalar(query) or 0)


def admit(session: Session, tenant_id: str, costs: Sequence[int], settings: Settings) -> None:
    """Charge ``costs`` (one per job, pixels x iterations) to the tenant, or refuse them all."""
    tenant = session.execute(
        select(Tenant.max_queued, Tenant.daily_budget_mpi)
        .where(Tenant.id == tenant_id)
        .with_for_update(key_share=True)
    ).first()
    max_queued = settings.tenant_max_queued if tenant is None or tenant[0] is None else tenant[0]
    budget = settings.tenant_daily_budget_mpi if tenant is None or tenant[1] is None else tenant[1]
    _check_queue(session, tenant_id, len(costs), max_queued)
    _charge(session, tenant_id, charge_of(costs), budget)


def _check_queue(session: Session, tenant_id: str, new: int, limit: int) -> None:
    if limit <= 0 or new == 0:
        return
    if new > limit:
        raise Forbidden(
            "submission_exceeds_queue_limit",
            f"this submission has {new} jobs and the limit of queued jobs is {limit}: "
            "submit them in smaller parts as earlier ones finish",
            limit=limit,
            requested=new,
        )
    queued = queued_count(session, tenant_id)
    if queued + new > limit:
        _refused(tenant_id, "tenant_queue_full", limit=limit, usage=queued, requested=new)
        raise TooManyRequests(
            "tenant_queue_full",
            f"you have {queued} queued jobs and the limit is {limit}, so {new} more do not fit: "
            "wait for some to start or finish, or cancel queued jobs, then retry",
            retry_after_s=QUEUE_FULL_RETRY_S,
            limit=limit,
            usage=queued,
            requested=new,
        )


def _charge(session: Session, tenant_id: str, mpi: int, budget: int) -> None:
    """Add ``mpi`` to today's usage if it stays within ``budget`` (0: always), atomically."""
    day = today()
    if budget > 0 and mpi > budget:
        raise Forbidden(
            "job_exceeds_daily_budget",
            f"this submission needs {mpi} megapixel-iterations and the whole daily budget is {budget}: "
            "use fewer or smaller jobs, fewer iterations, or ask for a larger budget",
            limit=budget,
            requested=mpi,
        )
    if mpi == 0:
        return
    _ensure_usage_row(session, tenant_id, day)
    stmt = update(TenantUsage).where(TenantUsage.tenant_id == tenant_id, TenantUsage.day == day)
    if budget > 0:
        stmt = stmt.where(TenantUsage.mpi + mpi <= budget)
    done = session.execute(
        stmt.values(mpi=TenantUsage.mpi + mpi).execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 1) == 1:
        return
    used = usage_on(session, tenant_id, day)
    _refused(tenant_id, "daily_budget_exceeded", limit=budget, usage=used, requested=mpi)
    raise TooManyRequests(
        "daily_budget_exceeded",
        f"today (UTC) you have used {used} of your {budget} megapixel-iterations and this submission "
        f"needs {mpi}: retry after midnight UTC, or submit fewer or smaller jobs",
        retry_after_s=seconds_to_midnight(),
        limit=budget,
        usage=used,
        requested=mpi,
    )


def _ensure_usage_row(session: Session, tenant_id: str, day: date) -> None:
    """INSERT the (tenant, day) row with 0 unless it exists (no error, no lost update)."""
    values = {"tenant_id": tenant_id, "day": day, "mpi": 0}
    if session.get_bind().dialect.name == "postgresql":
        session.execute(postgresql.insert(TenantUsage).values(values).on_conflict_do_nothing())
    else:
        session.execute(sqlite.insert(TenantUsage).values(values).on_conflict_do_nothing())


def _refused(tenant_id: str, code: str, *, limit: int, usage: int, requested: int) -> None:
    logs.event(
        logger,
        "quota_refused",
        kind="tenant",
        tenant_id=tenant_id,
        code=code,
        limit=limit,
        usage=usage,
        requested=requested,
    )


__all__ = [
    "DEFAULT",
    "LIMIT_FIELDS",
    "MPI",
    "OFF",
    "Limits",
    "admit",
    "charge_of",
    "effective_limits",
    "parse_rate_limit",
    "queued_count",
    "seconds_to_midnight",
    "set_limits",
    "today",
    "usage_on",
]
