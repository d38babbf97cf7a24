"""The worker's Prometheus metrics, recorded in its pool processes.

``stylequeue worker`` (``worker.supervisor``) serves them for the whole host on
``STYLEQUEUE_WORKER_METRICS_PORT``: it gives every Celery process it starts a fresh
``PROMETHEUS_MULTIPROC_DIR`` (``shared.metrics.host_metrics``), so prometheus_client runs in its
multiprocess mode here (each process writes its own files, the host's ``/metrics`` adds them up).
Without that variable (unit tests, a bare ``celery worker``) the values stay in this process.

Attempts are timed from their claim (the delivery's start, or ``worker.batch.gather`` for a group's
mates) to their settlement (``worker.settle``). Nothing here imports torch but ``gpu_memory``,
which reads CUDA only once this process initialised it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from shared.db import session_scope
from shared.metrics import MULTIPROC_ENV, aware, mark_process_dead
from shared.models import Job

logger = logging.getLogger(__name__)

OUTCOMES = frozenset({"succeeded", "failed", "canceled", "handed_back", "fenced", "transient"})
ENDED = frozenset({"succeeded", "failed", "canceled"})  # the job's last attempt: its queue wait counts
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")

JOBS = Counter("stylequeue_worker_jobs", "Job attempts settled by this host, by outcome", ["outcome"])
FAILURES = Counter("stylequeue_worker_job_failures", "Jobs failed by this host, by error code", ["code"])
DURATION = Histogram(
    "stylequeue_worker_job_duration_seconds",
    "Wall time of a job attempt, from its claim to its settlement, by outcome",
    ["outcome"],
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
QUEUE_WAIT = Histogram(
    "stylequeue_worker_queue_wait_seconds",
    "From a job's submission to its first start, observed when it ends",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
ITERATIONS = Counter("stylequeue_worker_iterations", "Optimizer iterations of the jobs delivered (results)")
SPEED = Histogram(
    "stylequeue_worker_iterations_per_second",
    "A delivered job's iterations over its engine seconds (a group's members share one run)",
    buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
GROUP_SIZE = Histogram(
    "stylequeue_worker_group_size",
    "Jobs run as one GPU batch, each time a batching worker starts a run (1: it ran alone)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
DROPPED = Counter(
    "stylequeue_worker_deliveries_dropped", "Deliveries acknowledged unrun, by reason", ["reason"]
)
BUSY = Gauge("stylequeue_worker_busy", "Deliveries running now, by GPU", ["gpu"], multiprocess_mode="livesum")
GPU_PEAK = Gauge(
    "stylequeue_worker_gpu_memory_peak_bytes",
    "Peak memory torch allocated during the last delivery, by GPU (largest over processes)",
    ["gpu"],
    multiprocess_mode="livemax",
)
GPU_USED = Gauge(
    "stylequeue_worker_gpu_memory_used_bytes",
    "Device memory in use (every process on the GPU) after the last delivery",
    ["gpu"],
    multiprocess_mode="livemax",
)
GPU_TOTAL = Gauge(
    "stylequeue_worker_gpu_memory_total_bytes", "Device memory", ["gpu"], multiprocess_mode="livemax"
)

_started: dict[str, float] = {}  # job id -> monotonic time of its claim, in this process


def gpu_label() -> str:
    """The GPU this process's worker drives (``CUDA_VISIBLE_DEVICES``, set per Celery worker)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "all"
    return visible.strip() or "cpu"


def bounded_code(code: str) -> str:
    return code if _CODE.fullmatch(code) else "other"


def attempt_started(job_id: str) -> None:
    _started[job_id] = time.monotonic()


def attempt_ended(job_id: str, outcome: str, code: str | None = None) -> None:
    """Count an attempt's outcome (and a failure's code) and its duration since ``attempt_started``."""
    label = outcome if outcome in OUTCOMES else "other"
    JOBS.labels(label).inc()
    if code is not None:
        FAILURES.labels(bounded_code(code)).inc()
    started = _started.pop(job_id, None)
    if started is not None:
        DURATION.labels(label).observe(time.monotonic() - started)


def job_ended(url: str, job_id: str, outcome: str) -> None:
    """For a job's final outcome: its queue wait (submission to first start), from its row."""
    if outcome not in ENDED:
        return
    try:
        with session_scope(url) as s:
            row = s.execute(select(Job.created_at, Job.started_at).where(Job.id == job_id)).first()
    except (SQLAlchemyError, OSError):  # the database may be what failed the job: no observation
        logger.debug("no queue wait for %s: the database did not answer", job_id)
        return
    if row is not None and row[0] is not None and row[1] is not None:
        QUEUE_WAIT.observe(max(0.0, (aware(row[1]) - aware(row[0])).total_seconds()))


def delivered(metadata: Mapping[str, Any]) -> None:
    """A result's iterations (those of this attempt: after any resume) and their speed."""
    steps, resumed, seconds = (
        metadata.get("steps"),
        metadata.get("resumed_from_step"),
        metadata.get("seconds"),
    )
    if not isinstance(steps, int):
        return
    done = max(0, steps - (resumed if isinstance(resumed, int) else 0))
    ITERATIONS.inc(done)
    if isinstance(seconds, int | float) and seconds > 0 and done:
        SPEED.observe(done / seconds)


def group_formed(size: int) -> None:
    GROUP_SIZE.observe(size)


def delivery_dropped(reason: str) -> None:
    DROPPED.labels(bounded_code(reason)).inc()


@contextmanager
def delivery() -> Iterator[None]:
    """Around one delivery: busy meanwhile; then the GPU's memory, and no attempt left timed."""
    gauge = BUSY.labels(gpu_label())
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()
        _started.clear()
        gpu_memory()


def gpu_memory() -> None:
    """The GPU memory gauges, once this process uses CUDA; the peak is reset for the next delivery."""
    import torch

    initialized: Callable[[], bool] = torch.cuda.is_initialized  # (unannotated in torch)
    try:
        if not initialized():  # never initialises CUDA itself
            return
        gpu = gpu_label()
        GPU_PEAK.labels(gpu).set(torch.cuda.max_memory_allocated())
        free, total = torch.cuda.mem_get_info()
        GPU_USED.labels(gpu).set(total - free)
        GPU_TOTAL.labels(gpu).set(total)
        torch.cuda.reset_peak_memory_stats()
    except RuntimeError as exc:  # a CUDA error: the job's outcome is recorded already
        logger.warning("GPU memory metrics not read: %s", exc)


def process_exited(**_: object) -> None:
    """``worker_process_shutdown``: this pool process's live gauges leave the host's sums."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        mark_process_dead(os.getpid(), path)


__all__ = [
    "attempt_ended",
    "attempt_started",
    "delivered",
    "delivery",
    "delivery_dropped",
    "gpu_memory",
    "group_formed",
    "job_ended",
    "process_exited",
]
