"""Publishing job messages to the broker, after the jobs are committed.

The API depends on the ``Publisher`` protocol; tests substitute a fake. ``CeleryPublisher`` sends every
message of a request over ONE producer (one broker connection), the task id being the job id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from shared import logs
from shared.queue import publish_job
from shared.settings import Settings

logger = logging.getLogger(__name__)

# Fail fast when the broker is down: the job stays queued with published_at NULL for the reconciler.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class Publisher(Protocol):
    def publish(self, job_ids: Sequence[str]) -> list[str]:
        """Publish in order; on a broker failure log, stop, and return the ids published so far."""
        ...

    def check(self) -> None:
        """Raise when the broker is unreachable."""
        ...


class CeleryPublisher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from shared.queue import make_celery

            self._app = make_celery(self._settings)
        return self._app

    def publish(self, job_ids: Sequence[str]) -> list[str]:
        app = self.app
        done: list[str] = []
        try:
            with app.producer_or_acquire() as producer:
                for job_id in job_ids:
                    publish_job(app, job_id, producer=producer, retry=True, retry_policy=_RETRY_POLICY)
                    done.append(job_id)
        except Exception as exc:  # noqa: BLE001 - broker down, timeouts...: the reconciler republishes later
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

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)


__all__ = ["CeleryPublisher", "Publisher"]
