"""``GET /v1/jobs/{id}/events`` and ``GET /v1/batches/{id}/events``: live events (Server-Sent Events).

The same authorisation as ``GET /v1/jobs/{id}`` and ``GET /v1/batches/{id}`` (the caller's tenant,
under the rate limits; another tenant's job or batch is a 404), then a stream (``api.events``) whose
watch reads the rows once per poll with a session of its own, closed at once.

Every job event's data is the job exactly as ``GET /v1/jobs/{id}`` answers it. A job stream sends
``status``, ``progress``, ``checkpoint`` and finally ``completed``; a batch stream sends ``status``,
``progress`` and ``checkpoint`` for each of its jobs, ``batch`` (counts per status) when the counts
change, and ``completed`` (the same summary) once every job is finished.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.deps import SessionDep, SettingsDep, StorageDep, TenantCtx, TenantDep
from api.events import (
    EventStreamResponse,
    JobView,
    StreamLimits,
    Watch,
    changes,
    event_stream,
    frames,
    micros,
    stream_slots,
)
from api.presenters import Linker, job_out
from api.queries import get_batch, get_job
from api.routes.jobs import EXPIRED_MESSAGE
from api.schemas import ERRORS, JobErrorOut
from shared import queue_position, retention
from shared.db import get_sessionmaker
from shared.errors import TooManyRequests
from shared.jobs import JobStatus
from shared.models import Batch, Job, utcnow
from shared.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(tags=["events"])

TOO_MANY_RETRY_S = 10  # Retry-After of a 429 too_many_streams
# A batch stream resumed from Last-Event-ID (the newest updated_at it had shown) sends again the jobs
# updated less than this before it: rows written by hosts whose clocks differ, or committed late.
RESUME_MARGIN_US = 10_000_000
Render = Callable[[Session, list[Job]], dict[str, str]]
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    # errors are JSON, as everywhere (the route's response class would document them as a stream)
    **{
        code: {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
        for code in ERRORS
    },
}


def renderer(linker: Linker, tenant_id: str) -> Render:
    """Jobs as ``GET /v1/jobs/{id}`` shows them (JSON, by job id); a queued one with its queue spot."""

    def render(session: Session, jobs: list[Job]) -> dict[str, str]:
        queued = [j for j in jobs if j.status == JobStatus.QUEUED]
        spots = queue_position.spots(session, tenant_id, queued, utcnow()) if queued else {}
        out = {}
        for job in jobs:
            shown = job_out(job, linker, spots.get(job.id))
            if job.status == JobStatus.SUCCEEDED and shown.error is None and retention.result_expired(job):
                shown.error = JobErrorOut(code="result_expired", message=EXPIRED_MESSAGE, retryable=None)
            out[job.id] = shown.model_dump_json()
        return out

    return render


class JobWatch:
    """One job: the events of what changed since ``last`` (the view a Last-Event-ID named), one
    ``completed`` for a finished job (also at once, whatever the client saw), then done."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        tenant_id: str,
        job_id: str,
        render: Render,
        last: JobView | None,
    ) -> None:
        self.sessions, self.tenant_id, self.job_id, self.render = sessions, tenant_id, job_id, render
        self.last = last
        self.first = True

    def poll(self) -> tuple[list[str], bool]:
        with self.sessions() as session:
            job = session.scalar(
                select(Job).where(
                    Job.id == self.job_id, Job.tenant_id == self.tenant_id, Job.deleted_at.is_(None)
                )
            )
            if job is None:  # deleted meanwhile: the stream ends, a reconnect gets the 404
                return [], True
            cur = JobView.of(job)
            kinds = changes(self.last, cur)
            if cur.terminal:
                kinds = ["completed"] if kinds or self.first else []
            self.first = False
            if not kinds:
                return [], False
            data = self.render(session, [job])[job.id]
        self.last = cur
        return frames([(kind, data) for kind in kinds], cur.event_id), cur.terminal


@dataclass
class _Seen:
    version: int
    view: JobView
    fraction: float  # as GET /v1/batches/{id} counts it: finished 1, running its fraction, queued 0


def _fraction(job: Job) -> float:
    if job.job_status.terminal:
        return 1.0
    if job.status != JobStatus.RUNNING:
        return 0.0
    return min(max(float((job.progress or {}).get("fraction") or 0.0), 0.0), 1.0)


class BatchWatch:
    """The jobs of one batch. Each poll: one light query (ids, updated_at) of the batch's jobs, then
    the full rows of those whose updated_at moved; ``seen`` holds one entry per job of the batch.
    ``resume_from``: the Last-Event-ID (µs) of a reconnect: jobs not updated since are not sent again."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        tenant_id: str,
        batch_id: str,
        render: Render,
        *,
        max_jobs: int,
        resume_from: int | None = None,
    ) -> None:
        self.sessions, self.tenant_id, self.batch_id, self.render = sessions, tenant_id, batch_id, render
        self.max_jobs = max_jobs
        self.seen: dict[str, _Seen] = {}
        self.skip_until = None if resume_from is None else resume_from - RESUME_MARGIN_US
        self.watermark = resume_from or 0
        self.counts: dict[str, int] | None = None

    def poll(self) -> tuple[list[str], bool]:
        with self.sessions() as session:
            versions = self._versions(session)
            if versions is None:  # the batch was deleted: the stream ends, a reconnect gets the 404
                return [], True
            for gone in self.seen.keys() - versions.keys():
                del self.seen[gone]
            moved = [
                jid for jid, v in versions.items() if jid not in self.seen or self.seen[jid].version != v
            ]
            shown = self._update(self._rows(session, moved)) if moved else []
            data = self.render(session, [job for job, _ in shown]) if shown else {}
        items = [(kind, data[job.id]) for job, kinds in shown for kind in kinds]
        summary = self.summary()
        if summary["counts"] != self.counts:
            self.counts = summary["counts"]
            items.append(("batch", json.dumps(summary)))
        if summary["done"]:
            items.append(("completed", json.dumps(summary)))
        return (frames(items, str(self.watermark)) if items else []), summary["done"]

    def _versions(self, session: Session) -> dict[str, int] | None:
        rows = session.execute(
            select(Job.id, Job.updated_at)
            .where(Job.batch_id == self.batch_id, Job.tenant_id == self.tenant_id, Job.deleted_at.is_(None))
            .limit(self.max_jobs)
        ).all()
        if not rows and not session.scalar(
            select(Batch.id).where(Batch.id == self.batch_id, Batch.deleted_at.is_(None))
        ):
            return None
        return {job_id: micros(at) for job_id, at in rows}

    def _rows(self, session: Session, job_ids: list[str]) -> list[Job]:
        query = select(Job).where(
            Job.id.in_(job_ids), Job.batch_id == self.batch_id, Job.deleted_at.is_(None)
        )
        return list(session.scalars(query.order_by(Job.created_at, Job.id)))

    def _update(self, jobs: list[Job]) -> list[tuple[Job, list[str]]]:
        """Record the jobs' views; the jobs to show, with their event types."""
        shown = []
        for job in jobs:
            cur, prev = JobView.of(job), self.seen.get(job.id)
            self.seen[job.id] = _Seen(cur.version, cur, _fraction(job))
            self.watermark = max(self.watermark, cur.version)
            if prev is None and self.skip_until is not None and cur.version <= self.skip_until:
                continue  # shown before the client reconnected
            kinds = changes(prev.view if prev else None, cur)
            if kinds:
                shown.append((job, kinds))
        return shown

    def summary(self) -> dict[str, Any]:
        counts = Counter({str(s): 0 for s in JobStatus})
        counts.update(seen.view.status for seen in self.seen.values())
        total = len(self.seen)
        return {
            "id": self.batch_id,
            "job_count": total,
            "counts": dict(counts),
            "progress": round(sum(s.fraction for s in self.seen.values()) / total, 4) if total else 1.0,
            "done": all(s.view.terminal for s in self.seen.values()),
        }


def _stream(
    request: Request,
    settings: Settings,
    tenant: TenantCtx,
    watch: Watch,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> Response:
    """The response, once the tenant has a free stream slot (else 429 ``too_many_streams``)."""
    slots = stream_slots(request.app)
    if not slots.acquire(tenant.id, settings.events_max_streams):
        raise TooManyRequests(
            "too_many_streams",
            f"{settings.events_max_streams} event streams are already open for this tenant (or the "
            "server is at its limit of streams); close one first",
            retry_after_s=TOO_MANY_RETRY_S,
        )
    limits = StreamLimits(settings.events_poll_s, settings.events_max_duration_s, slots.polls)
    return EventStreamResponse(
        event_stream(watch, limits, job_id=job_id, batch_id=batch_id),
        on_close=lambda: slots.release(tenant.id),
    )


@router.get(
    "/v1/jobs/{job_id}/events",
    status_code=200,
    response_class=EventStreamResponse,
    responses=STREAM_DOC,
    summary="Live events of a job (Server-Sent Events; Last-Event-ID resumes)",
)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    """``status``, ``progress`` (at most one per poll), ``checkpoint``, then ``completed`` and the end;
    each event's data is the job as ``GET /v1/jobs/{id}`` shows it."""
    get_job(session, tenant.id, job_id)  # 404: unknown, another tenant's, or deleted
    session.close()  # no connection held while the stream lasts: each poll opens its own
    last = JobView.parse(request.headers.get("last-event-id"))
    render = renderer(Linker(request, settings, storage), tenant.id)
    watch = JobWatch(get_sessionmaker(settings.database_url), tenant.id, job_id, render, last)
    return _stream(request, settings, tenant, watch, job_id=job_id)


@router.get(
    "/v1/batches/{batch_id}/events",
    status_code=200,
    response_class=EventStreamResponse,
    responses=STREAM_DOC,
    summary="Live events of a batch's jobs (Server-Sent Events; Last-Event-ID resumes)",
)
def batch_events(
    batch_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    """Per job ``status``/``progress``/``checkpoint`` (data: the job), ``batch`` (counts) when they
    change, and ``completed`` once every job is finished."""
    get_batch(session, tenant.id, batch_id)
    session.close()
    raw = request.headers.get("last-event-id") or ""
    resume_from = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 else None
    render = renderer(Linker(request, settings, storage), tenant.id)
    sessions = get_sessionmaker(settings.database_url)
    watch = BatchWatch(
        sessions, tenant.id, batch_id, render, max_jobs=settings.max_batch_jobs, resume_from=resume_from
    )
    return _stream(request, settings, tenant, watch, batch_id=batch_id)


__all__ = ["BatchWatch", "JobWatch", "renderer", "router"]
