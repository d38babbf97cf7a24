"""SQLAlchemy 2 models: tenants, API keys, stored images, batches, jobs, idempotency keys, usage, workers.

The ``jobs`` table is the source of truth: a queue message only says "look at job X".
Schema changes go through Alembic (``shared/migrations``); tests create tables with the migrations too.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.jobs import INITIAL, JobStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The tenant's share of the workers relative to other tenants' (fair dispatch).
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Per-tenant overrides of the settings (NULL: STYLEQUEUE_TENANT_MAX_QUEUED and friends).
    max_queued: Mapped[int | None] = mapped_column(Integer, default=None)
    max_running: Mapped[int | None] = mapped_column(Integer, default=None)
    daily_budget_mpi: Mapped[int | None] = mapped_column(BigInteger, default=None)
    rate_limit: Mapped[str | None] = mapped_column(String(200), default=None)
    # Standard Webhooks signing secret ("whsec_..."), made on first use; after a rotation the
    # previous one also signs until webhook_secret_previous_until (receivers switch over meanwhile).
    webhook_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100), default=None)
    webhook_secret_previous_until: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; keys never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # rotation overlap or expiry
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class StoredImage(Base):
    """One uploaded image, stored once under ``images/<sha256>`` whoever uploads it."""

    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the bytes
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantImage(Base):
    """Which tenant may use which stored image (an id is only usable by tenants who uploaded it)."""

    __tablename__ = "tenant_images"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    # The batch's webhook (its jobs carry it too) and its event filter (shared.webhooks.EVENTS)
    webhook: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # Jobs of a webhook batch that reached a terminal state: the one that makes it job_count emits
    # batch.completed (counted in the transaction of each job's last move, so exactly once).
    finished_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
        Index("ix_jobs_dispatch", "status", "tenant_id", "priority", "created_at", "id"),
        Index("ix_jobs_bucket", "status", "bucket", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True, default=None)
    # The enum at the ORM level, stored as its plain strings in a VARCHAR(16): no native enum type
    # and no CHECK constraint, so the column is exactly the migrations' String(16).
    status: Mapped[JobStatus] = mapped_column(
        Enum(
            JobStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=INITIAL,
    )
    # Validated engine controls (shared.params.JobParams.model_dump()).
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    content_image_id: Mapped[str] = mapped_column(ForeignKey("images.id"))
    style_image_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Spatial control: one mask image per style (same order as style_image_ids), or NULL for none.
    mask_image_ids: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # {scale, scales, iteration, iterations, step, total_steps, fraction, loss, eta_seconds}
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Attempts started so far; also the fencing token: only the holder of the newest attempt may
    # write progress, checkpoints or the result (UPDATE ... WHERE attempt = :mine).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # graceful hand-backs (shared.jobstore.release): attempts that did not count (attempt - handbacks did)
    handbacks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    error_retryable: Mapped[bool | None] = mapped_column(default=None)
    result_key: Mapped[str | None] = mapped_column(String(300), default=None)
    # [{"key": ..., "preview_key": ..., "scale": i, "iteration": n, "step": s, "at": iso}]
    checkpoints: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # the scale a new attempt starts at: 0, or its latest checkpoint's (the next one after a
    # checkpoint that ended its scale); a GPU group takes only jobs that start at one scale
    resume_scale: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    # Higher first, within the tenant's share (never ahead of other tenants).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # JobParams.work(): pixels x iterations (upper bound), what fair dispatch charges the tenant.
    cost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)  # hidden; purged when finished
    # shared.buckets.bucket_key: jobs with equal keys can share a GPU batch; NULL: runs alone
    bucket: Mapped[str | None] = mapped_column(String(32), default=None)
    # how the attempt that ended it ran: device, precision, weights, random_weights, group_size,
    # engine_seconds (worker.batch); NULL until then
    execution: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # when retention or a delete removed its result and checkpoints (410 result_expired after)
    emptied_at: Mapped[datetime | None] = mapped_column(default=None)
    # Where to POST its events (an https URL checked by shared.webhook_guard) and which ones
    webhook: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)  # also right for a row built with a plain string, unflushed


class IdempotencyKey(Base):
    """``Idempotency-Key`` of a POST: the same key and body return the first response."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TenantUsage(Base):
    """Compute charged to a tenant per UTC day, in megapixel-iterations (kept when jobs are deleted)."""

    __tablename__ = "tenant_usage"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    mpi: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Worker(Base):
    """A registered worker process (one Celery worker: one GPU, or the CPU) and its heartbeat."""

    __tablename__ = "workers"
    __table_args__ = (Index("ix_workers_heartbeat", "heartbeat_at"),)
    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery node name#main pid
    host: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(String(300))  # the weights source it loaded (or failed to)
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # jobs at once
    status: Mapped[str] = mapped_column(String(16))  # starting | healthy | unhealthy | stopping
    detail: Mapped[str | None] = mapped_column(Text, default=None)  # why unhealthy, and the remedy
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEvent(Base):
    """The outbox: one event to deliver (shared.webhooks), written in the transaction of the change
    it reports; its id is the ``webhook-id`` of every attempt, so receivers can drop repeats."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_due", "state", "next_attempt_at"),
        Index("ix_webhook_events_finished", "finished_at"),  # retention's prune
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_<32 hex>
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)  # no FK: outlives
    batch_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)  # purges
    event: Mapped[str] = mapped_column(String(32))  # start | checkpoint | completed | batch.completed
    url: Mapped[str] = mapped_column(String(2048))
    # The body, frozen at the first attempt so that every retry sends the same bytes
    payload: Mapped[str | None] = mapped_column(Text, default=None)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(default=None)  # a message is on its way
    lease_until: Mapped[datetime | None] = mapped_column(default=None)  # an attempt is under way
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One delivery attempt of an event (``GET /v1/jobs/{id}/webhooks``)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_job", "job_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(String(300), default=None)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSessionRevocation(Base):
    """A web page session that was signed out (``api.web.auth.sign_out``): its token is refused until it
    expires. Each sign-out deletes the rows whose tokens have expired, so the table holds only the
    sessions signed out within the last ``STYLEQUEUE_WEB_SESSION_HOURS``."""

    __tablename__ = "web_session_revocations"
    sid: Mapped[str] = mapped_column(String(43), primary_key=True)  # the token's sid (tokens.new_nonce)
    expires_at: Mapped[datetime] = mapped_column(index=True)  # the token's own expiry
