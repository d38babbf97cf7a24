"""Reading jobs and batches for one tenant: lookups, cursor pagination, batch summaries.

Another tenant's job or batch is simply not found (404): ids never leak across tenants. Nor is a
deleted one (``deleted_at`` set: hidden at once, its row purged later by ``shared.retention``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.presenters import aware
from api.safejson import loads
from shared.errors import InvalidInput, NotFound
from shared.jobs import JobStatus
from shared.models import Batch, Job

MAX_PAGE = 200
MAX_CURSOR = 200  # characters; the cursors this API returns are about 100
MAX_DATETIME = 64  # characters of a created_after / created_before value
# Job and batch ids are lowercase UUIDs (shared.models.new_id): anything else names nothing, and is
# answered without a query (PostgreSQL text cannot even hold some of what a client may send).
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_row_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def _shown(value: str) -> str:
    return repr(value[:80])


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = (
        session.scalar(
            select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.deleted_at.is_(None))
        )
        if is_row_id(job_id)
        else None
    )
    if job is None:
        raise NotFound("job_not_found", f"no job {_shown(job_id)}")
    return job


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = (
        session.scalar(
            select(Batch).where(
                Batch.id == batch_id, Batch.tenant_id == tenant_id, Batch.deleted_at.is_(None)
            )
        )
        if is_row_id(batch_id)
        else None
    )
    if batch is None:
        raise NotFound("batch_not_found", f"no batch {_shown(batch_id)}")
    return batch


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, job id) a cursor of ours holds; ``invalid_cursor`` for anything else."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, job_id = loads(raw, what="cursor", max_bytes=MAX_CURSOR, max_depth=1)
        if not isinstance(stamp, str) or not isinstance(job_id, str) or not is_row_id(job_id):
            raise ValueError("not a cursor")
        return datetime.fromisoformat(stamp), job_id
    except (ValueError, TypeError, binascii.Error, InvalidInput):
        raise InvalidInput("invalid_cursor", "cursor is not one this API returned") from None


def _status(raw: str | None) -> JobStatus | None:
    """The ``status`` filter of a job listing; ``invalid_status`` for anything else."""
    if raw is None:
        return None
    try:
        return JobStatus(raw)
    except ValueError:
        allowed = ", ".join(JobStatus)
        raise InvalidInput("invalid_status", f"status must be one of: {allowed}") from None


def parse_datetime(raw: str, name: str) -> datetime:
    """An ISO 8601 date or date-time (``Z`` or an offset; none means UTC), as an aware UTC time;
    ``invalid_datetime`` for anything else."""
    try:
        if len(raw) > MAX_DATETIME:
            raise ValueError("too long")
        text = raw.strip()
        if text.endswith(("Z", "z")):  # what Python 3.10's fromisoformat does not read
            text = text[:-1] + "+00:00"
        value = datetime.fromisoformat(text)
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise InvalidInput(
            "invalid_datetime",
            f"{name} {_shown(raw)} is not an ISO 8601 date-time, e.g. 2026-05-01T12:00:00Z or 2026-05-01",
            parameter=name,
        ) from None


@dataclass(frozen=True)
class JobFilters:
    """What a job listing is narrowed to: every filter given must hold."""

    status: JobStatus | None = None
    batch_id: str | None = None
    created_after: datetime | None = None  # at or after
    created_before: datetime | None = None  # strictly before

    @classmethod
    def parse(
        cls,
        status: str | None = None,
        batch_id: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> JobFilters:
        """The query parameters checked: 422 ``invalid_status``, ``invalid_batch_id``,
        ``invalid_datetime``, or ``invalid_time_range`` (created_after not before created_before)."""
        wanted = _status(status)
        if batch_id and not is_row_id(batch_id):
            raise InvalidInput("invalid_batch_id", f"batch_id {_shown(batch_id)} is not a batch id")
        after = parse_datetime(created_after, "created_after") if created_after else None
        before = parse_datetime(created_before, "created_before") if created_before else None
        if after is not None and before is not None and after >= before:
            raise InvalidInput("invalid_time_range", "created_after must be earlier than created_before")
        return cls(wanted, batch_id or None, after, before)

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.status is not None:
            clauses.append(Job.status == self.status)
        if self.batch_id:
            clauses.append(Job.batch_id == self.batch_id)
        if self.created_after is not None:
            clauses.append(Job.created_at >= self.created_after)
        if self.created_before is not None:
            clauses.append(Job.created_at < self.created_before)
        return clauses


def list_jobs(
    session: Session,
    tenant_id: str,
    filters: JobFilters,
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[Job], str | None]:
    """Newest first, by (created_at, id): stable under concurrent inserts, no duplicates. A cursor
    only says where the last page ended, so a page after it is right for any filters (the client
    sends the same ones again)."""
    query = select(Job).where(Job.tenant_id == tenant_id, Job.deleted_at.is_(None), *filters.where())
    if cursor:
        at, last_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < last_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return rows, next_cursor


def batch_summary(session: Session, batch: Batch) -> dict[str, Any]:
    """Counts per status, overall progress (finished jobs count as 1) and job ids."""
    rows = session.execute(
        select(Job.id, Job.status, Job.progress)
        .where(Job.batch_id == batch.id, Job.deleted_at.is_(None))
        .order_by(Job.created_at, Job.id)
    ).all()
    counts = Counter({str(s): 0 for s in JobStatus})
    done = 0.0
    for _, status, progress in rows:
        counts[status] += 1
        if JobStatus(status).terminal:
            done += 1.0
        elif status is JobStatus.RUNNING:
            done += min(max(float((progress or {}).get("fraction") or 0.0), 0.0), 1.0)
    total = len(rows)
    return {
        "id": batch.id,
        "job_count": total,
        "counts": dict(counts),
        "progress": round(done / total, 4) if total else 1.0,
        "done": all(JobStatus(r[1]).terminal for r in rows),
        "params": batch.params,
        "created_at": aware(batch.created_at),
        "job_ids": [r[0] for r in rows],
    }


__all__ = [
    "MAX_PAGE",
    "JobFilters",
    "batch_summary",
    "is_row_id",
    "decode_cursor",
    "encode_cursor",
    "get_batch",
    "get_job",
    "list_jobs",
    "parse_datetime",
]
