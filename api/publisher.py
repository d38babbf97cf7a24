"""Publishing job messages to the broker, after the jobs are committed.

The API depends on the ``Publisher`` protocol; tests substitute a fake. ``CeleryPublisher`` sends every
message of a request over ONE producer (one broker connection), the task id being the job id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from shared.queue import publish_many
from shared.settings import Settings

logger = logging.getLogger(__name__)


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
        return publish_many(self.app, job_ids)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)


__all__ = ["CeleryPublisher", "Publisher"]
