"""The Celery task: a thin adapter from a queue delivery to ``worker.runner.run_job``.

Celery is only the doorbell: the message carries the job id (also the task id) and the job row says
everything else. Transient errors are retried here with backoff; the runner has already handed the job
back to the queue so the retry can claim it. Everything else is settled inside the runner.

Retries use Celery's exponential backoff with full jitter (a random wait up to
``min(retry_backoff_max_s, retry_backoff_s * 2**retries)``), from the settings
(``STYLEQUEUE_RETRY_BACKOFF_S``, ``STYLEQUEUE_RETRY_BACKOFF_MAX_S``, ``STYLEQUEUE_MAX_RETRIES``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from shared import logs, webhooks
from shared.db import get_sessionmaker
from shared.queue import RUN_JOB_TASK, get_celery, publish_many, webhook_queue
from shared.settings import get_settings
from worker import jobstore, metrics, registry, runner, runtime, settle

logger = logging.getLogger(__name__)

app = get_celery()

_settings = get_settings()
# Webhook events this worker's commits wrote (a job started, checkpointed, ended) go to the
# sender's queue at once; the dispatcher's pass publishes any this misses.
webhooks.publish_after_commit(
    get_sessionmaker(_settings.database_url),
    lambda ids: publish_many(app, ids, webhooks_to=webhook_queue(_settings)),
)


class JobTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries spent on a transient error: fail the job if no attempt holds it."""
        job_id = args[0] if args else task_id
        # The exception's text (endpoints, paths, SQL) is for the log, never for the tenant.
        message = (
            f"storage or the database stayed unreachable; gave up after {self.max_retries} "
            "retries. Submit the job again later"
        )
        try:
            if jobstore.fail_released(get_settings().database_url, job_id, "unavailable", message):
                settle.log_event(
                    job_id,
                    None,
                    "failed",
                    logging.ERROR,
                    code="unavailable",
                    error=type(exc).__name__,
                    detail=repr(str(exc)[:200]),
                )
                metrics.attempt_ended(job_id, "failed", "unavailable")
        except Exception:  # noqa: BLE001 - logged; the reconciler fails the job when its lease ends
            logs.event(logger, "fail_after_retries_failed", job_id=job_id, level=logging.ERROR, exc_info=True)


@app.task(
    name=RUN_JOB_TASK,
    bind=True,
    base=JobTask,
    acks_late=True,
    autoretry_for=settle.TRANSIENT,
    retry_backoff=max(1, _settings.retry_backoff_s),
    retry_backoff_max=max(1, _settings.retry_backoff_max_s),
    retry_jitter=True,
    max_retries=_settings.max_retries,
    # A little before the hard limit (which kills the pool process): the job fails as time_limit.
    soft_time_limit=max(1, _settings.task_time_limit_s - 30),
)
def run_job(self: Task, job_id: str) -> str:
    metrics.attempt_started(job_id)  # the delivery's claim: its attempt is timed from here
    with metrics.delivery():
        outcome: str = runner.run_job(job_id, self.request.hostname or "worker@localhost", get_settings())
    if outcome.startswith("dropped:"):
        metrics.delivery_dropped(outcome.partition(":")[2])
    return outcome


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: Any) -> None:
    logs.configure(loglevel or logging.INFO)  # the service's one configuration (shared.logs)


def _init_pool_process(**_: Any) -> None:
    runtime.init_pool_process(on_error=registry.engine_failed)  # a failed load marks the worker unhealthy


# The main process: check the weights and register before the pool forks (or refuse: exit 2), beat,
# healthy once consuming, stopping on a warm shutdown, unregistered at the end (worker.registry).
celeryd_after_setup.connect(registry.on_after_setup, weak=False)
worker_ready.connect(registry.on_ready, weak=False)
worker_shutting_down.connect(registry.on_shutting_down, weak=False)
worker_shutdown.connect(registry.on_shutdown, weak=False)
# Each pool process: load the engine in the background.
worker_process_init.connect(_init_pool_process, weak=False)
worker_process_shutdown.connect(metrics.process_exited, weak=False)  # its live gauges leave the sums
worker_shutting_down.connect(runtime.on_worker_shutting_down, weak=False)
