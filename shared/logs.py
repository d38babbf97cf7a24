"""The service's one log-line shape, and its configuration in one place.

Every event the API, the workers and the reconciler log is one line of one shape::

    job_event job_id=<id or -> attempt=<n or -> event=<name> key=value ...

(``request_event``, ``image_event``, ``tenant_event``... for events about something other than a
job: the same shape, with ``job_id=-``). ``key=value`` pairs keep their order (values as ``str``,
exceptions as ``repr``). ``STYLEQUEUE_LOG_FORMAT=json`` writes each record as one JSON object
instead, with the
event's fields as keys, for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMAT_ENV = "STYLEQUEUE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"


def event(
    logger: logging.Logger,
    name: str,
    /,
    *,
    kind: str = "job",
    job_id: str | None = None,
    attempt: int | None = None,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log one event in the shape above; ``fields`` also travel as structured data (JSON format)."""
    if not logger.isEnabledFor(level):
        return
    text = "".join(f" {k}={_text(v)}" for k, v in fields.items())
    data = {
        "kind": kind,
        "job_id": job_id,
        "attempt": attempt,
        "event": name,
        **{k: _plain(v) for k, v in fields.items()},
    }
    logger.log(
        level,
        "%s_event job_id=%s attempt=%s event=%s%s",
        kind,
        job_id or "-",
        "-" if attempt is None else attempt,
        name,
        text,
        exc_info=exc_info,
        extra={"event_fields": data},
    )


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, BaseException) else str(value)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value) if isinstance(value, BaseException) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the event's fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        fields = getattr(record, "event_fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler[Any]):
    """Writes to ``sys.stderr`` as it is at each record (pytest and some runners swap it), unless a
    stream is set with ``setStream``: a handler configured once never writes to a closed stream."""

    def __init__(self) -> None:
        super().__init__()
        self._fixed: Any = None

    @property
    def stream(self) -> Any:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        self._fixed = None if value is sys.stderr else value


def configure(level: int | str = logging.INFO, log_format: str | None = None) -> None:
    """Configure the root logger once per process (CLI commands, Celery worker processes):
    ``log_format`` "text" (default) or "json"; None reads STYLEQUEUE_LOG_FORMAT."""
    chosen = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


__all__ = ["LOG_FORMAT_ENV", "JsonFormatter", "configure", "event"]
