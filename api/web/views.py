"""What the pages show, read for one tenant: batch rows with their counts, job cards (the job exactly as
``GET /v1/jobs/{id}`` presents it, with links to the page's own image routes), ETAs and states in words."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.presenters import Linker, job_out
from api.queries import batch_summary, decode_cursor, encode_cursor
from api.routes.jobs import EXPIRED_MESSAGE
from api.schemas import JobErrorOut, JobOut
from shared import queue_position, retention
from shared.jobs import JobStatus
from shared.models import Batch, Job, StoredImage, TenantImage, utcnow

BATCHES_PER_PAGE = 25
SINGLE_JOBS_SHOWN = 20
UPLOADS_SHOWN = 48


class WebLinker(Linker):
    """Links to the page's routes (``/web/jobs/...``, signed-in by the session cookie) where the API's
    would be ``/v1/jobs/...``; presigned storage URLs (S3) as the API gives them."""

    def link(self, key: str | None, api_path: str) -> str | None:
        if not key:
            return None
        url = self.storage.url_for(key, expires_s=self.expires)
        return url if url is not None else "/web" + api_path.removeprefix("/v1")


def image_url(image_id: str) -> str:
    return f"/web/images/{image_id}"


def duration_words(seconds: float | None) -> str | None:
    """``about 40 s``, ``about 3 min``, ``about 1 h 5 min``; None when unknown."""
    if seconds is None or seconds < 0:
        return None
    s = round(seconds)
    if s < 60:
        return f"about {max(s, 1)} s"
    if s < 3600:
        return f"about {round(s / 60)} min"
    return f"about {s // 3600} h {round(s % 3600 / 60)} min"


def state_words(job: JobOut) -> str:
    """The job's state in a sentence."""
    p = job.progress
    if job.status == JobStatus.QUEUED:
        if job.queue is None:
            return "queued"
        ahead = f"{job.queue.position} of your jobs ahead" if job.queue.position else "next in line"
        starts = duration_words(job.queue.eta_seconds)
        return f"queued: {ahead}" + (f", starts in {starts}" if starts else "")
    if job.status == JobStatus.RUNNING:
        if job.cancel_requested:
            return "stopping: cancel requested"
        if p.scale is None or p.scales is None:
            return "running: starting"
        return (
            f"running: scale {p.scale + 1} of {p.scales}, iteration {p.iteration or 0} of {p.iterations or 0}"
        )
    if job.status == JobStatus.FAILED and job.error is not None:
        return f"failed: {job.error.message}"
    return str(job.status)


@dataclass(frozen=True)
class JobCard:
    job: JobOut
    index: int  # in its batch, from 0 (creation order)
    state: str
    eta: str | None
    preview: str | None  # the newest checkpoint's preview (full size)
    content: str  # links of the input images
    styles: list[str]

    @property
    def terminal(self) -> bool:
        return JobStatus(self.job.status).terminal

    @property
    def thumb(self) -> str | None:
        """What a grid shows: the result, else the newest checkpoint's preview, each as its small
        thumbnail (a job of an earlier version has none: then the full image)."""
        if self.job.result_url:
            return self.job.result_thumb_url or self.job.result_url
        latest = self.job.checkpoints[-1] if self.job.checkpoints else None
        return None if latest is None else latest.thumb_url or latest.preview_url

    @property
    def percent(self) -> int:
        return round(100 * min(max(self.job.progress.fraction, 0.0), 1.0))


def shown(job: Job, linker: Linker, spot: queue_position.QueueSpot | None = None) -> JobOut:
    """The job as ``GET /v1/jobs/{id}`` shows it (a result deleted by retention says so)."""
    out = job_out(job, linker, spot)
    if job.status == JobStatus.SUCCEEDED and out.error is None and retention.result_expired(job):
        out.error = JobErrorOut(code="result_expired", message=EXPIRED_MESSAGE, retryable=None)
    return out


def cards(session: Session, tenant_id: str, jobs: list[Job], linker: Linker) -> list[JobCard]:
    spots = queue_position.spots(session, tenant_id, jobs, utcnow())
    out = []
    for index, job in enumerate(jobs):
        view = shown(job, linker, spots.get(job.id))
        eta = view.progress.eta_seconds if view.status == JobStatus.RUNNING else None
        out.append(
            JobCard(
                view,
                index,
                state_words(view),
                duration_words(eta),
                view.checkpoints[-1].preview_url if view.checkpoints else None,
                image_url(view.content_id),
                [image_url(s) for s in view.style_ids],
            )
        )
    return out


def batch_jobs(session: Session, tenant_id: str, batch_id: str) -> list[Job]:
    query = select(Job).where(Job.tenant_id == tenant_id, Job.batch_id == batch_id, Job.deleted_at.is_(None))
    return list(session.scalars(query.order_by(Job.created_at, Job.id)))


def recent_batches(
    session: Session, tenant_id: str, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """The tenant's batches, newest first, as ``GET /v1/batches/{id}`` sums them up; a cursor for more."""
    query = select(Batch).where(Batch.tenant_id == tenant_id, Batch.deleted_at.is_(None))
    if cursor:
        at, last_id = decode_cursor(cursor)
        query = query.where((Batch.created_at < at) | ((Batch.created_at == at) & (Batch.id < last_id)))
    rows = list(
        session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(BATCHES_PER_PAGE + 1))
    )
    more, rows = len(rows) > BATCHES_PER_PAGE, rows[:BATCHES_PER_PAGE]
    summaries = [batch_summary(session, b) for b in rows]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
    return summaries, next_cursor


def single_jobs(session: Session, tenant_id: str) -> list[Job]:
    """The newest jobs submitted alone (``POST /v1/jobs``)."""
    query = select(Job).where(Job.tenant_id == tenant_id, Job.batch_id.is_(None), Job.deleted_at.is_(None))
    return list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(SINGLE_JOBS_SHOWN))
    )


def uploads(session: Session, tenant_id: str) -> list[StoredImage]:
    """The tenant's newest uploaded images (to pick from instead of uploading again)."""
    query = (
        select(StoredImage)
        .join(TenantImage, TenantImage.image_id == StoredImage.id)
        .where(TenantImage.tenant_id == tenant_id)
        .order_by(TenantImage.created_at.desc(), StoredImage.id)
        .limit(UPLOADS_SHOWN)
    )
    return list(session.scalars(query))


MAX_HISTORY_POINTS = 2048  # of a job's progress history shown (a row written by any worker)


def counts_words(counts: dict[str, int]) -> list[tuple[str, int]]:
    """The non-zero status counts, in lifecycle order."""
    return [(str(s), counts.get(str(s), 0)) for s in JobStatus if counts.get(str(s), 0)]


def loss_points(job: JobOut, raw: dict[str, Any] | None = None) -> list[list[float]]:
    """The loss curve the worker kept (``progress["history"]``: at most 64 evenly spaced points per
    scale, worker.loss_history) and the latest point ([scale, iteration, loss]); the page's script
    adds one per progress event while it watches."""
    known = [
        [int(p[0]), int(p[1]), float(p[2])]
        for p in (raw or {}).get("history") or []
        if isinstance(p, list) and len(p) == 3 and all(isinstance(v, int | float) for v in p)
    ][:MAX_HISTORY_POINTS]
    p = job.progress
    if p.loss is not None and p.scale is not None and p.iteration is not None:
        known.append([p.scale, p.iteration, p.loss])
    return known


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


__all__ = [
    "JobCard",
    "WebLinker",
    "batch_jobs",
    "cards",
    "counts_words",
    "duration_words",
    "image_url",
    "loss_points",
    "recent_batches",
    "shown",
    "single_jobs",
    "state_words",
    "uploads",
    "when",
]
