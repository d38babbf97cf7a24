"""One settings object for the API, the worker and the CLI, read once from the environment.

Every field can be set as ``STYLEQUEUE_<FIELD>`` (e.g. ``STYLEQUEUE_DATABASE_URL``). With nothing set,
everything runs on one machine with no server installed (the *embedded default*): a SQLite database
file, kombu's SQL transport on SQLite as the broker, and a local storage folder, all under ``data_dir``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.params import HARD_MAX_SCALES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STYLEQUEUE_", extra="ignore")

    # --- where things live (empty = embedded default under data_dir) ---
    data_dir: Path = Path(".stylequeue")
    database_url: str = (
        ""  # e.g. postgresql+psycopg://user@host/db; default sqlite:///<data_dir>/stylequeue.db
    )
    broker_url: str = ""  # e.g. redis://host:6379/0; default sqla+sqlite:///<data_dir>/broker.db
    storage_url: str = ""  # file:///path or s3://bucket/prefix; default file://<data_dir>/storage
    s3_endpoint_url: str | None = None  # MinIO, Ceph, R2, moto...
    # where clients outside the servers' network reach that S3 (presigned links name it), e.g.
    # https://s3.example.com behind a TLS proxy; empty: links name s3_endpoint_url
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presign_expiry_s: int = 3600

    # --- API ---
    auth: Literal["on", "off"] = "on"  # "off" only for a single local user
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = ""  # base URL of links in responses (https://...); empty: relative links
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # lower than Pillow's 89.5 MP warning on purpose
    max_size: int = 2048  # largest output long edge a job may ask for
    max_iterations: int = 5000  # total iterations over all scales
    max_batch_jobs: int = 1000
    max_styles: int = 8
    max_scales: int = 16  # scales in one job's coarse-to-fine schedule (explicit or computed)
    # Total work a job may ask for: sum over scales of long_edge**2 * iterations (a square image
    # is the worst case). The default 512 job is ~4.9e7, a default 2048 job ~2.2e8.
    max_job_work: int = 2_000_000_000
    max_json_bytes: int = 1024 * 1024  # a JSON request body (batches naming image ids)
    max_form_bytes: int = 256 * 1024 * 1024  # a multipart request body (files of a batch or job)
    max_request_pixels: int = 256_000_000  # decoded pixels over all images of one request
    decode_threads: int = 2  # image inspection runs in this many threads, off the event loop
    max_inflight_uploads: int = 8  # submissions inspected at once (uploads in memory); more get 503
    body_timeout_s: float = 300.0  # a request body must arrive within this (slow senders: 408)
    auth_off_allow_remote: bool = False  # auth=off refuses a non-loopback api_host unless set

    # --- queue and worker ---
    queue_name: str = "stylequeue"
    task_time_limit_s: int = 4 * 3600
    visibility_timeout_s: int = 5 * 3600  # must exceed task_time_limit_s (checked at worker start)
    weights: str = "imagenet"  # imagenet | PATH | caffe:PATH | random (tests and demos only)
    device: str = "auto"
    progress_interval_s: float = 1.0  # progress written to the DB at most this often
    checkpoints_keep: int = 3  # latest checkpoints kept per job; older objects are deleted
    # Checkpoints are written at each scale's end and on a shutdown, and on these cadences:
    checkpoint_interval_s: float = 30.0  # after this much wall time since the last one (0 = off)
    checkpoint_every: int = 0  # every N iterations (0 = off)
    # A GPU worker runs up to batch_max jobs of one bucket (shared.buckets) as one batch (worker.batch):
    # the delivered job and waiting ones it takes from the table. None = auto: 16 on CUDA, 1 on CPU.
    batch_max: int | None = None
    batch_wait_ms: int = 250  # with some found, wait at most this long for more to fill the group
    max_attempts: int = 3  # lost workers (not transient errors) a job may survive
    retry_backoff_s: int = 2  # transient errors: exponential backoff from this (whole seconds)...
    retry_backoff_max_s: int = 120  # ...up to this, with jitter
    max_retries: int = 8
    # A worker's heartbeat (its job rows and its ``workers`` row) every heartbeat_s; a job or worker
    # silent for lease_s is presumed dead. A whole worker killed: its jobs run again within about
    # lease_s + dispatch_interval_s.
    heartbeat_s: float = 2.0
    lease_s: float = 15.0

    # --- dispatch: the database is the queue, the broker a shallow delivery channel ---
    dispatch_interval_s: float = 2.0  # the dispatcher's pass (also: reconcile, purge)
    # Messages in the broker beyond one per idle slot: 0 keeps fairness exact (a job is published
    # when a slot frees); more hides the dispatch round trip at the cost of fairness.
    dispatch_ahead: int = 0
    publish_grace_s: float = 30.0  # a job published but not started for this long is published again

    # --- per tenant (overrides: ``stylequeue tenants set-limits``) ---
    rate_limit: str = "20/second;600/minute"  # per API key ("" = off); the limits library's syntax
    rate_limit_storage: str = ""  # limits storage URI; default: the Redis broker, else in-process
    tenant_max_queued: int = 2000  # queued jobs a tenant may have (0 = no limit)
    tenant_max_running: int = 0  # jobs of a tenant running at once (0 = its fair share only)
    tenant_daily_budget_mpi: int = 1_000_000  # megapixel-iterations a tenant may submit per UTC day
    key_rotate_overlap_s: float = 86400.0  # after a rotation the old key still works this long

    # --- webhooks (shared.webhooks; delivered by ``stylequeue webhooks``, a Celery worker of their own) ---
    # Targets also allowed when private or plain http: comma-separated hosts or CIDRs (tests, LANs).
    webhook_allow_hosts: str = ""
    webhook_timeout_s: float = 10.0  # one delivery attempt, connect to last byte
    webhook_max_response_bytes: int = 64 * 1024  # of a receiver's answer read (the rest is dropped)
    webhook_retry_window_s: float = 24 * 3600.0  # retries of one event stop this long after it
    webhook_backoff_s: float = 5.0  # first retry after about this, doubling, with jitter...
    webhook_backoff_max_s: float = 3600.0  # ...up to this
    webhook_concurrency: int = 8  # deliveries at once per ``stylequeue webhooks`` process

    # --- live events (GET /v1/jobs/{id}/events, Server-Sent Events) ---
    events_poll_s: float = 0.5  # a stream looks at its job(s) this often (progress: a few a second)
    events_max_streams: int = 20  # open streams per tenant (more get 429)
    events_max_duration_s: float = 600.0  # a stream ends after this; clients resume (Last-Event-ID)

    # --- web page (api/web: sign-in kept in an HMAC-signed session cookie, no table) ---
    # The key that signs the page's session cookies and CSRF tokens. "" = a random one made once and
    # kept in <data_dir>/web_secret (mode 0600); several API hosts that do not share data_dir must
    # all be given the same value (32 or more random characters). Changing it signs everyone out.
    web_secret: str = ""
    web_session_hours: float = 8.0  # a sign-in lasts this long (never past its API key's expiry)

    # --- metrics (prometheus-client; never public by default) ---
    metrics_token: str = ""  # GET /metrics on the API needs "Authorization: Bearer <token>"; "" = 404
    worker_metrics_port: int = 0  # each worker host serves /metrics here (0 = off)
    dispatcher_metrics_port: int = 0  # the dispatcher serves DB gauges (jobs by status, tenant) here

    # --- retention ---
    retention_days: float = 30.0  # finished jobs' results and checkpoints are purged after (0 = never)

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'stylequeue.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data / 'broker.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{data / 'storage'}"
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if not 1 <= self.max_scales <= HARD_MAX_SCALES:
            raise ValueError(f"max_scales must be between 1 and {HARD_MAX_SCALES}")
        return self

    @model_validator(mode="after")
    def _rate_limit_parses(self) -> Settings:
        from limits import parse_many

        if self.rate_limit.strip():
            try:
                parse_many(self.rate_limit)
            except ValueError:
                raise ValueError(
                    f"rate_limit {self.rate_limit!r} is not a rate limit such as '20/second;600/minute'"
                ) from None
        return self

    @property
    def embedded(self) -> bool:
        """True when the broker is kombu's SQL transport (no visibility timeout, no fanout)."""
        return self.broker_url.startswith("sqla+")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call ``get_settings.cache_clear()``."""
    return Settings()


__all__ = ["Settings", "get_settings"]
