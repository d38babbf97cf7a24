"""A small HTTP client for the stylequeue API (used by ``stylequeue submit`` and ``status``).

``job_events`` / ``batch_events`` follow the live events (Server-Sent Events, ``api.events``): they
reconnect with ``Last-Event-ID`` when a stream ends or drops (a bounded number of failed tries in a
row, with backoff), and poll the JSON endpoints instead when the server has no events route.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from api.events import SseEvent, SseParser
from shared.jobs import TERMINAL, JobStatus

logger = logging.getLogger(__name__)

MAX_RECONNECTS = 5  # failed connections in a row before the error is raised
BACKOFF_MAX_S = 30.0
READ_TIMEOUT_S = 60.0  # a stream silent this long (4 missed keep-alives) is dead: reconnect
MIN_STREAM_S = 5.0  # a stream that ends sooner without an event counts as a failed try
POLL_S = 1.0  # the fallback's polling interval
_RETRYABLE = frozenset({429, 502, 503, 504})
_NAMED_404 = frozenset({"job_not_found", "batch_not_found"})  # a 404 that is not "no such route"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class StyleQueueClient:
    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        max_reconnects: int = MAX_RECONNECTS,
        poll_s: float = POLL_S,
    ) -> None:
        self.max_reconnects, self.poll_s = max_reconnects, poll_s
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs: dict[str, Any] = {"transport": transport} if transport else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, **kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> StyleQueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            raise _error(resp)
        return resp.json()

    def upload_image(self, data: bytes, filename: str = "image") -> dict[str, Any]:
        """Upload once: if this tenant already has these bytes, nothing is sent again."""
        digest = hashlib.sha256(data).hexdigest()
        known = self.http.get(f"/v1/images/{digest}")
        if known.status_code == 200:
            return dict(known.json())
        resp = self.http.post("/v1/images", files={"file": (filename, data)})
        return dict(self._json(resp))

    def upload_path(self, path: Path) -> str:
        return str(self.upload_image(path.read_bytes(), path.name)["id"])

    def submit_batch(
        self,
        contents: list[str],
        styles: list[str],
        *,
        mode: str = "product",
        pairs: list[list[Any]] | None = None,
        params: dict[str, Any] | None = None,
        masks: list[str] | None = None,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
    ) -> dict[str, Any]:
        """``masks``: mask image ids, named by index as a pair's third element; ``webhook``: an https
        URL for the batch's events (``webhook_events``: which; default completed, batch.completed)."""
        body: dict[str, Any] = {"contents": contents, "styles": styles, "mode": mode, "params": params or {}}
        if pairs is not None:
            body["pairs"] = pairs
        if masks:
            body["masks"] = masks
        if webhook:
            body["webhook"] = webhook
        if webhook_events is not None:
            body["webhook_events_filter"] = webhook_events
        return dict(self._json(self.http.post("/v1/batches", json=body)))

    def webhook_secret(self, *, rotate: bool = False) -> dict[str, Any]:
        """The tenant's webhook signing secret; ``rotate``: a new one (the old one signs for a while)."""
        if rotate:
            return dict(self._json(self.http.post("/v1/webhooks/secret/rotate")))
        return dict(self._json(self.http.get("/v1/webhooks/secret")))

    def submit_job(
        self,
        content_id: str,
        style_ids: list[str],
        params: dict[str, Any] | None = None,
        mask_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """``mask_ids``: none, or one content mask per style (same order)."""
        import json

        data = {"content_id": content_id, "style_id": style_ids, "params": json.dumps(params or {})}
        if mask_ids:
            data["mask_id"] = mask_ids
        return dict(self._json(self.http.post("/v1/jobs", data=data)))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}")))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/batches/{batch_id}")))

    def list_jobs(self, **filters: Any) -> list[dict[str, Any]]:
        """Every job matching the filters, following the cursor."""
        items: list[dict[str, Any]] = []
        params = {k: v for k, v in filters.items() if v is not None} | {"limit": 200}
        while True:
            page = self._json(self.http.get("/v1/jobs", params=params))
            items += page["items"]
            if not page["next_cursor"]:
                return items
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/jobs/{job_id}/cancel")))

    def download_result(self, job_id: str, dest: Path) -> Path:
        """Save a finished job's result (following a redirect to S3 without our key)."""
        resp = self.http.get(f"/v1/jobs/{job_id}/result", follow_redirects=True)
        if resp.status_code >= 400:
            self._json(resp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(resp.content)
        return dest

    def job_events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[SseEvent]:
        """The job's events (``status``, ``progress``, ``checkpoint``, data: the job) up to and
        including ``completed``."""
        return self._events(f"/v1/jobs/{job_id}/events", last_event_id, lambda: self._poll_job(job_id))

    def batch_events(self, batch_id: str, *, last_event_id: str | None = None) -> Iterator[SseEvent]:
        """Events of the batch's jobs (data: the job), ``batch`` (counts per status) and finally
        ``completed`` (the same summary)."""
        path = f"/v1/batches/{batch_id}/events"
        return self._events(path, last_event_id, lambda: self._poll_batch(batch_id))

    def _events(
        self, path: str, last_id: str | None, fallback: Callable[[], Iterator[SseEvent]]
    ) -> Iterator[SseEvent]:
        failures, retry_s = 0, 2.0
        while True:
            started, got_event, clean, wait_s, error = time.monotonic(), False, False, 0.0, None
            try:
                with self.http.stream(
                    "GET", path, headers=_sse_headers(last_id), timeout=_stream_timeout()
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        error, wait_s = _error(resp), _retry_after(resp)
                    else:
                        parser = SseParser(last_id)
                        for event in _read(resp, parser):
                            last_id, got_event = event.id, True
                            yield event
                            if event.event == "completed":
                                return
                        clean, retry_s = True, parser.retry_ms / 1000 if parser.retry_ms else retry_s
            except httpx.TransportError:
                if failures >= self.max_reconnects:
                    raise
            if error is not None and error.status == 404 and error.code not in _NAMED_404:
                yield from fallback()  # an older server, without the events routes
                return
            if error is not None and (error.status not in _RETRYABLE or failures >= self.max_reconnects):
                raise error
            failures = (
                0 if got_event or (clean and time.monotonic() - started >= MIN_STREAM_S) else failures + 1
            )
            if failures > self.max_reconnects:
                raise ApiError(
                    0, "stream_failed", f"{path}: the event stream ended {failures} times in a row"
                )
            time.sleep(max(wait_s, min(retry_s * 2 ** max(failures - 1, 0), BACKOFF_MAX_S)))

    def _poll_job(self, job_id: str) -> Iterator[SseEvent]:
        """The events of a job, polled (a server without the events route)."""
        last: tuple[Any, ...] | None = None
        while True:
            job = self.get_job(job_id)
            kind, last = _polled_kind(last, job)
            if kind:
                done = job["status"] in TERMINAL
                yield SseEvent("completed" if done else kind, json.dumps(job))
                if done:
                    return
            time.sleep(self.poll_s)

    def _poll_batch(self, batch_id: str) -> Iterator[SseEvent]:
        """The events of a batch, polled: its jobs' changes, ``batch`` counts, ``completed``."""
        seen: dict[str, tuple[Any, ...]] = {}
        counts: dict[str, int] | None = None
        while True:
            jobs = self.list_jobs(batch_id=batch_id)
            for job in jobs:
                kind, seen[job["id"]] = _polled_kind(seen.get(job["id"]), job)
                if kind:
                    yield SseEvent(kind, json.dumps(job))
            summary = _summary(batch_id, jobs)
            if summary["counts"] != counts:
                counts = summary["counts"]
                yield SseEvent("batch", json.dumps(summary))
            if summary["done"]:
                yield SseEvent("completed", json.dumps(summary))
                return
            time.sleep(self.poll_s)


def _error(resp: httpx.Response) -> ApiError:
    try:
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", resp.text[:200]
    return ApiError(resp.status_code, code, message)


def _read(resp: httpx.Response, parser: SseParser) -> Iterator[SseEvent]:
    for line in resp.iter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


def _retry_after(resp: httpx.Response) -> float:
    raw = resp.headers.get("retry-after", "")
    return min(float(raw), BACKOFF_MAX_S) if raw.isascii() and raw.isdigit() else 0.0


def _sse_headers(last_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    return headers


def _stream_timeout() -> httpx.Timeout:
    return httpx.Timeout(10.0, read=READ_TIMEOUT_S)


def _polled_kind(prev: tuple[Any, ...] | None, job: dict[str, Any]) -> tuple[str | None, tuple[Any, ...]]:
    """The event type a polled change shows (None: nothing changed), and what to compare next time."""
    key = (job["status"], job["attempts"], job["cancel_requested"], len(job["checkpoints"]), job["progress"])
    if prev is None or prev[:3] != key[:3]:
        return "status", key
    if prev[3] != key[3]:
        return "checkpoint", key
    return ("progress" if prev[4] != key[4] else None), key


def _summary(batch_id: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {str(s): 0 for s in JobStatus}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    done = [1.0 if j["status"] in TERMINAL else float(j["progress"].get("fraction") or 0) for j in jobs]
    return {
        "id": batch_id,
        "job_count": len(jobs),
        "counts": counts,
        "progress": round(sum(done) / len(jobs), 4) if jobs else 1.0,
        "done": all(j["status"] in TERMINAL for j in jobs),
    }


__all__ = ["ApiError", "StyleQueueClient"]
