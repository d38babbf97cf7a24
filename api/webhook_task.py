"""The webhook sender's Celery task (``stylequeue webhooks`` runs a worker of its queue only).

A thin adapter: the message carries an outbox event id; ``api.webhook_sender.Sender`` does one
attempt. Retries are not Celery's: the outbox schedules the next attempt in the database and the
dispatcher's pass publishes it when it is due, so a killed sender loses no retry (its lease ends
and the event is published again). The task never raises for a receiver's failure.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import setup_logging

from api.webhook_sender import Sender
from shared import logs
from shared.db import get_sessionmaker
from shared.queue import WEBHOOK_TASK, get_celery
from shared.settings import get_settings
from shared.storage import open_storage

logger = logging.getLogger(__name__)

app = get_celery()


@lru_cache(maxsize=1)
def sender() -> Sender:
    settings = get_settings()
    return Sender(get_sessionmaker(settings.database_url), settings, open_storage(settings))


@app.task(name=WEBHOOK_TASK, acks_late=True, ignore_result=True)
def deliver_webhook(event_id: str) -> str:
    return sender().deliver(event_id) or "nothing to do"


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: object) -> None:
    logs.configure(loglevel or logging.INFO)  # the service's one configuration (shared.logs)


__all__ = ["app", "deliver_webhook", "sender"]
