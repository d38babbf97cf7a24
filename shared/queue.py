"""The Celery application shared by the API (which only publishes) and the worker (which consumes).

Configured for multi-minute GPU jobs (see ../shared/docs/queue-facts.md): late acks, reject on worker
lost, prefetch 1, and a broker visibility timeout longer than the task time limit. The job row is the
source of truth; a message carries only the job id, and the task id is the job id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery

from shared import logs
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "stylequeue.run_job"
WEBHOOK_TASK = "stylequeue.deliver_webhook"  # api.webhook_task, on webhook_queue(settings)


def webhook_queue(settings: Settings) -> str:
    """The webhook sender's own queue: GPU workers never consume it."""
    return f"{settings.queue_name}.webhooks"


def make_celery(settings: Settings) -> Celery:
    app = Celery("stylequeue", broker=settings.broker_url)
    transport_options: dict[str, object] = {}
    if not settings.embedded:
        transport_options = {
            "visibility_timeout": settings.visibility_timeout_s,
            # Restore unacknowledged messages of a dead worker quickly (default sweep: ~100 s).
            "unacked_restore_throttle": 1,
            "unacked_restore_interval": 2,
        }
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_time_limit=settings.task_time_limit_s,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.embedded:
        _tune_sql_transport()
    return app


def _tune_sql_transport() -> None:
    # Passing polling_interval through broker_transport_options crashes kombu's SQL transport
    # (TypeError from create_engine); the class attribute works. 0.1 s keeps pickup latency low.
    # The attribute lives on the Transport (kombu.transport.virtual.base.Transport.drain_events reads
    # self.polling_interval); setting it on Channel had no effect (measured ~0.8 s pickup delay).
    from kombu.transport.sqlalchemy import Transport

    Transport.polling_interval = 0.1


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def publish_job(app: Celery, job_id: str, **options: object) -> None:
    """Publish one job after its row is committed. The task id is the job id. ``options`` go to
    ``send_task`` (e.g. a shared ``producer`` for a batch, a ``retry_policy``)."""
    app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=app.conf.task_default_queue, **options)


# Fail fast when the broker is down: the jobs stay waiting and the next pass publishes them.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def publish_many(app: Celery, job_ids: Sequence[str], *, webhooks_to: str | None = None) -> list[str]:
    """Publish in order over ONE producer (one broker connection); on a broker failure log, stop,
    and return the ids published so far. ``webhooks_to``: these are webhook event ids, for the
    sender's queue of that name (``webhook_queue``)."""
    done: list[str] = []
    try:
        with app.producer_or_acquire() as producer:
            for job_id in job_ids:
                options = {"producer": producer, "retry": True, "retry_policy": _RETRY_POLICY}
                if webhooks_to is None:
                    publish_job(app, job_id, **options)
                else:
                    app.send_task(WEBHOOK_TASK, args=[job_id], queue=webhooks_to, **options)
                done.append(job_id)
    except Exception as exc:  # noqa: BLE001 - broker down, timeouts...: the jobs are published later
        missed = job_ids[len(done)] if len(done) < len(job_ids) else "-"
        logs.event(
            logger,
            "publish_failed",
            job_id=missed,
            level=logging.ERROR,
            published=len(done),
            unpublished=len(job_ids) - len(done),
            error=repr(exc),
        )
    return done
