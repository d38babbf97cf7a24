"""Live events (Server-Sent Events): the wire format, event ids, the per-tenant limit on open streams
and the loop that streams one watched job or batch (``api.routes.events`` has the routes and watches).

A stream looks at its rows every ``events_poll_s`` in a worker thread (never on the event loop), sends
an event only when what it shows changed, a ``: ping`` comment after ``KEEPALIVE_S`` of silence, and
ends after ``events_max_duration_s`` (the client resumes with ``Last-Event-ID``). ``SseParser`` reads
the same format back (``api.client``).

A job's event id is its *view*: ``<updated_at µs>.<status>.<attempt>.<cancel 0|1>.<checkpoint>.<progress>``
(the last two: CRC32s of the newest checkpoint's key and of the progress JSON). A reconnect with it
is compared with the row as it is now: equal, nothing is sent; else the events of the difference. A
batch's event id is the newest ``updated_at`` (µs) the stream has shown.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared import logs
from shared.db import is_db_outage
from shared.jobs import JobStatus

if TYPE_CHECKING:
    from shared.models import Job

logger = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # a ": ping" comment after this much silence, so proxies keep the connection
RETRY_MS = 2000  # the reconnect delay a client is told (``retry:``)
MAX_EVENT_ID = 200  # a longer Last-Event-ID is not one of ours: ignored
MAX_EVENT_DATA = 8 * 1024 * 1024  # characters of one event's data a parser accepts
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_JOB_ID = re.compile(
    r"(?P<version>[0-9]{1,20})\.(?P<status>[a-z]{1,16})\.(?P<attempt>[0-9]{1,9})\.(?P<cancel>[01])"
    r"\.(?P<checkpoint>-|[0-9a-f]{8})\.(?P<progress>[0-9a-f]{8})"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SLOTS_LOCK = threading.Lock()


def frame(event: str, data: str, event_id: str | None = None) -> str:
    """One event on the wire: ``event:``, ``id:`` (if any), one ``data:`` line per line of data."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return "\n".join(lines) + "\n\n"


def frames(items: list[tuple[str, str]], event_id: str) -> list[str]:
    """The events of one poll, ``(type, data)`` each: only the last carries the id, so a client that
    resumes after an earlier one still gets the rest."""
    last = len(items) - 1
    return [frame(kind, data, event_id if i == last else None) for i, (kind, data) in enumerate(items)]


@dataclass(frozen=True)
class SseEvent:
    """An event as a client sees it: ``id`` is the stream's last event id when it was dispatched."""

    event: str = "message"
    data: str = ""
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Lines in (without their line break), events out, by the HTML standard's rules: comments and
    unknown fields ignored, ``data`` lines joined with newlines, the last ``id`` kept across events,
    ``retry`` kept in ``retry_ms``."""

    def __init__(self, last_id: str | None = None, max_data: int = MAX_EVENT_DATA) -> None:
        self.last_id = last_id
        self.retry_ms: int | None = None
        self.max_data = max_data
        self._event = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._size += len(value) + 1
            if self._size > self.max_data:
                raise ValueError(f"an event's data is over {self.max_data} characters")
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data, self._size = "", [], 0
        return SseEvent(event, "\n".join(data), self.last_id) if data else None


def micros(at: datetime) -> int:
    """A stored time as integer microseconds since the epoch (SQLite's times are naive UTC)."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def _crc(value: Any) -> str:
    return f"{zlib.crc32(json.dumps(value, sort_keys=True, default=str).encode()):08x}"


@dataclass(frozen=True)
class JobView:
    """What a job's events show, and the id that names it (``version``: not compared)."""

    status: str
    attempt: int
    cancel: bool
    checkpoint: str  # CRC32 of the newest checkpoint's key, or "-"
    progress: str  # CRC32 of the progress JSON
    version: int = field(default=0, compare=False)

    @property
    def terminal(self) -> bool:
        return JobStatus(self.status).terminal

    @property
    def event_id(self) -> str:
        cancel = int(self.cancel)
        return f"{self.version}.{self.status}.{self.attempt}.{cancel}.{self.checkpoint}.{self.progress}"

    @classmethod
    def of(cls, job: Job) -> JobView:
        newest = job.checkpoints[-1] if job.checkpoints else None
        return cls(
            status=str(job.status),
            attempt=job.attempt or 0,
            cancel=bool(job.cancel_requested),
            checkpoint=_crc(newest.get("key") or newest) if isinstance(newest, dict) else "-",
            progress=_crc(job.progress or {}),
            version=micros(job.updated_at),
        )

    @classmethod
    def parse(cls, event_id: str | None) -> JobView | None:
        """The view a Last-Event-ID names; None for anything that is not one of ours."""
        found = _JOB_ID.fullmatch(event_id or "") if len(event_id or "") <= MAX_EVENT_ID else None
        if found is None or found["status"] not in set(JobStatus):
            return None
        return cls(
            found["status"],
            int(found["attempt"]),
            found["cancel"] == "1",
            found["checkpoint"],
            found["progress"],
            int(found["version"]),
        )


def changes(prev: JobView | None, cur: JobView) -> list[str]:
    """The event types that tell what changed (none: nothing to send). Without ``prev``, a snapshot
    (``status``). A progress change is told only when nothing else is (every event carries it)."""
    if prev is None:
        return ["status"]
    kinds = []
    if (prev.status, prev.attempt, prev.cancel) != (cur.status, cur.attempt, cur.cancel):
        kinds.append("status")
    if prev.checkpoint != cur.checkpoint and cur.checkpoint != "-":
        kinds.append("checkpoint")
    if not kinds and prev.progress != cur.progress:
        kinds.append("progress")
    return kinds


MAX_STREAMS = 500  # open streams in one API process, every tenant's together
POLL_THREADS = 8  # streams' database polls at once (their own limiter: sync routes keep anyio's)


class StreamSlots:
    """Open streams per tenant in this process (entries only while a tenant has one open), at most
    ``MAX_STREAMS`` in all; their polls share a thread limiter of their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.polls = anyio.CapacityLimiter(POLL_THREADS)

    def acquire(self, tenant_id: str, limit: int) -> bool:
        with self._lock:
            if self._open.get(tenant_id, 0) >= limit or sum(self._open.values()) >= MAX_STREAMS:
                return False
            self._open[tenant_id] = self._open.get(tenant_id, 0) + 1
            return True

    def release(self, tenant_id: str) -> None:
        with self._lock:
            left = self._open.get(tenant_id, 0) - 1
            if left > 0:
                self._open[tenant_id] = left
            else:
                self._open.pop(tenant_id, None)

    def open(self, tenant_id: str) -> int:
        with self._lock:
            return self._open.get(tenant_id, 0)


def stream_slots(app: FastAPI) -> StreamSlots:
    """The app's slots, made on first use."""
    with _SLOTS_LOCK:
        slots: StreamSlots | None = getattr(app.state, "event_slots", None)
        if slots is None:
            slots = app.state.event_slots = StreamSlots()
        return slots


class Watch(Protocol):
    """What a stream watches: ``poll()`` (run in a worker thread, with a session of its own) returns
    the frames to send and whether the stream is done."""

    def poll(self) -> tuple[list[str], bool]: ...


@dataclass(frozen=True)
class StreamLimits:
    poll_s: float
    max_duration_s: float
    polls: anyio.CapacityLimiter | None = None  # the streams' own thread limiter (StreamSlots.polls)


async def event_stream(
    watch: Watch, limits: StreamLimits, *, job_id: str | None = None, batch_id: str | None = None
) -> AsyncIterator[str]:
    """The frames of one stream: ``retry:``, then the watch's frames until it is done, the client
    leaves (cancelled here) or the lifetime ends; ``job_id``/``batch_id`` name it in the log."""
    subject: dict[str, Any] = {"batch_id": batch_id} if batch_id else {}
    started = anyio.current_time()
    deadline, quiet_since, sent, reason = started + limits.max_duration_s, started, 0, "client_left"
    yield f"retry: {RETRY_MS}\n\n"
    try:
        while True:
            chunks, done = await anyio.to_thread.run_sync(watch.poll, limiter=limits.polls)
            now = anyio.current_time()
            if chunks:
                sent, quiet_since = sent + len(chunks), now
                yield "".join(chunks)
            elif now - quiet_since >= KEEPALIVE_S:
                quiet_since = now
                yield ": ping\n\n"
            if done or now >= deadline:
                reason = "done" if done else "max_duration"
                return
            await anyio.sleep(min(limits.poll_s, max(deadline - now, 0.0)))
    except (DBAPIError, PoolTimeoutError) as exc:
        if isinstance(exc, DBAPIError) and not is_db_outage(exc):
            raise
        reason = "db_unavailable"  # the client reconnects (and gets 503 until the database is back)
    finally:
        seconds = round(anyio.current_time() - started, 1)
        logs.event(
            logger,
            "events_stream_closed",
            kind="request",
            job_id=job_id,
            **subject,
            reason=reason,
            events=sent,
            seconds=seconds,
        )


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` once however it ends (done, client gone, error)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers=HEADERS)
        self._on_close: Callable[[], None] | None = on_close

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


__all__ = [
    "EventStreamResponse",
    "JobView",
    "SseEvent",
    "SseParser",
    "StreamLimits",
    "StreamSlots",
    "Watch",
    "changes",
    "event_stream",
    "frame",
    "frames",
    "micros",
    "stream_slots",
]
