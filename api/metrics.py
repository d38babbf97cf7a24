"""The API's Prometheus metrics: requests by route template and status, latency by route, accepted
submissions and the jobs they created, error answers by code; served on ``GET /metrics``.

``/metrics`` is not public: it answers 404 unless ``STYLEQUEUE_METRICS_TOKEN`` is set, and then only
to ``Authorization: Bearer <token>`` (else 401). Labels are bounded: the route is the matched route's
template (``/v1/jobs/{job_id}``, never the raw path) or ``other``, the method one of the HTTP
methods or ``other``. The values are this process's (one uvicorn process: ``stylequeue api``); with
``PROMETHEUS_MULTIPROC_DIR`` set, e.g. under ``uvicorn --workers N``, the answer adds up the files of
every process there. The database gauges (jobs by status and tenant) are the dispatcher's, not the
API's: every replica would run the same queries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import MULTIPROC_ENV, bearer_ok, files_collector

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()  # the API's own: not prometheus_client's global one
if not os.environ.get(MULTIPROC_ENV):
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)

OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SUBMISSIONS = {"/v1/jobs": "job", "/v1/batches": "batch"}  # POST route template -> kind
MAX_ANSWER_BYTES = 1024 * 1024  # a batch's 202 answer is read for its job_count up to this size
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

REQUESTS = Counter(
    "stylequeue_api_requests",
    "Requests answered, by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "stylequeue_api_request_duration_seconds",
    "From a request's arrival to its answer's last byte, by route template and method",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "stylequeue_api_requests_in_flight",
    "Requests being handled now",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
SUBMITTED = Counter(
    "stylequeue_api_submissions",
    "Submissions accepted (202, not an idempotent replay), by kind",
    ["kind"],
    registry=REGISTRY,
)
JOBS_CREATED = Counter(
    "stylequeue_api_jobs_created",
    "Jobs created by accepted submissions, by kind",
    ["kind"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "stylequeue_api_rejections", "Error answers, by error code (api.errors)", ["code"], registry=REGISTRY
)


def rejected(code: str) -> None:
    """Count one error answer (``api.errors.error_body``: every error the API renders)."""
    REJECTIONS.labels(code if _CODE.fullmatch(code) else OTHER).inc()


def route_label(scope: Scope) -> str:
    """The matched route's template (set by the router), else ``other``: a bounded label."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path.startswith("/") else OTHER


class _Submission:
    """A submission's 202 answer: counted once it is complete (a batch's job_count from its body)."""

    def __init__(self, kind: str) -> None:
        self.kind, self.body, self.accepted = kind, b"", False

    def start(self, message: Message) -> None:
        headers = {k.lower(): v for k, v in message.get("headers", [])}
        replayed = headers.get(b"idempotent-replayed", b"").lower() == b"true"
        self.accepted = message["status"] == 202 and not replayed

    def chunk(self, message: Message) -> None:
        if self.accepted and self.kind == "batch" and len(self.body) < MAX_ANSWER_BYTES:
            self.body += message.get("body", b"")

    def count(self) -> None:
        if not self.accepted:
            return
        SUBMITTED.labels(self.kind).inc()
        jobs = 1
        if self.kind == "batch":
            try:
                jobs = int(json.loads(self.body)["job_count"])
            except (ValueError, KeyError, TypeError):
                logger.warning("a batch's 202 answer had no readable job_count: its jobs are not counted")
                return
        JOBS_CREATED.labels(self.kind).inc(jobs)


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: streamed bodies pass through untouched).
    Outermost, so that it sees the body limit's 413s and the 500 of an unhandled exception too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception ends in ServerErrorMiddleware's 500
        method = scope["method"] if scope["method"] in METHODS else OTHER
        submission: _Submission | None = None

        async def observing_send(message: Message) -> None:
            nonlocal status, submission
            if message["type"] == "http.response.start":
                status = message["status"]
                kind = SUBMISSIONS.get(route_label(scope)) if method == "POST" else None
                if kind is not None:
                    submission = _Submission(kind)
                    submission.start(message)
            elif message["type"] == "http.response.body" and submission is not None:
                submission.chunk(message)
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observing_send)
        finally:
            IN_FLIGHT.dec()
            route = route_label(scope)
            REQUESTS.labels(route, method, str(status)).inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)
            if submission is not None:
                submission.count()


def exposition() -> bytes:
    """This process's metrics, or with ``PROMETHEUS_MULTIPROC_DIR`` every process's files."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        files_collector(registry, None)  # registers itself
        return generate_latest(registry)
    return generate_latest(REGISTRY)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """404 without ``STYLEQUEUE_METRICS_TOKEN`` (as if there were no such route), 401 without it."""
    token: str = request.app.state.settings.metrics_token
    if not token:
        raise HTTPException(404, "Not Found")
    if not bearer_ok(request.headers.get("authorization"), token):
        raise HTTPException(401, "a valid metrics token is required", headers={"WWW-Authenticate": "Bearer"})
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


__all__ = ["REGISTRY", "MetricsMiddleware", "rejected", "route_label", "router"]
