"""Prometheus metrics of the processes that are not the API: a small ``/metrics`` HTTP server (behind
the bearer token when ``STYLEQUEUE_METRICS_TOKEN`` is set), the worker host's multiprocess export
(``host_metrics``, run by ``stylequeue worker``) and the dispatcher's gauges read from the database
(``JobsCollector``, served by ``stylequeue dispatch`` on ``STYLEQUEUE_DISPATCHER_METRICS_PORT``).

The database gauges are exported by the dispatcher only, never by each API replica: one query set per
scrape (at most one per ``MIN_INTERVAL_S``), each statement bounded by ``QUERY_TIMEOUT_MS`` on
PostgreSQL, tenants bounded to the ``TOP_TENANTS`` with the most jobs (the rest are ``other``).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from shared import logs
from shared.jobs import TERMINAL, JobStatus
from shared.models import Job, Tenant, Worker, utcnow

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger(__name__)

# prometheus_client's multiprocess module has no annotations: these are its signatures.
mark_process_dead: Callable[[int, str | None], None] = multiprocess.mark_process_dead
files_collector: Callable[[CollectorRegistry | None, str | None], Collector] = (
    multiprocess.MultiProcessCollector
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TOP_TENANTS = 20  # tenants labelled by name; the others are summed as "other"
OTHER = "other"
QUERY_TIMEOUT_MS = 2000
MIN_INTERVAL_S = 5.0  # scrapes closer together than this get the previous values
RECENT_S = 3600.0  # stylequeue_jobs_finished_last_hour
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


# --- the bearer token and the HTTP server ----------------------------------------------------------


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>`` names ``token`` (compared in constant time)."""
    scheme, _, given = (header or "").strip().partition(" ")
    return (
        bool(token)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), token.encode())
    )


def guarded(app: WSGIApplication, token: str) -> WSGIApplication:
    """``app`` on ``/metrics`` only, behind ``token`` when it is set."""

    def answer(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if token and not bearer_ok(environ.get("HTTP_AUTHORIZATION"), token):
            headers = [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')]
            start_response("401 Unauthorized", headers)
            return [b"a valid metrics token is required\n"]
        return app(environ, start_response)

    return answer


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def serve(port: int, registry: CollectorRegistry, token: str = "", host: str | None = None) -> WSGIServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread; ``shutdown()`` stops it.
    Without a token only on loopback (tenant names and counts are not for everyone on the network);
    with one on every interface."""
    host = host or ("0.0.0.0" if token else "127.0.0.1")
    if not token:
        logger.warning("metrics on port %d without STYLEQUEUE_METRICS_TOKEN: serving on 127.0.0.1 only", port)
    httpd = make_server(host, port, guarded(make_wsgi_app(registry), token), _Server, _QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    logs.event(logger, "metrics_serving", kind="metrics", port=port, token="set" if token else "none")
    return httpd


# --- a worker host: every Celery process's files, one port ------------------------------------------

_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostCollector(Collector):
    """The multiprocess files of ``path``; live gauges of processes that died without saying so
    (``kill -9``, a pool process lost) are dropped first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files = files_collector(None, str(path))

    def collect(self) -> Iterable[Metric]:
        for pid in {int(m[1]) for p in self.path.iterdir() if (m := _LIVE_FILE.fullmatch(p.name))}:
            if not _alive(pid):
                mark_process_dead(pid, str(self.path))
        return self._files.collect()


@contextmanager
def host_metrics(port: int, token: str) -> Iterator[dict[str, str]]:
    """With ``port`` (not 0): a fresh multiprocess folder for this host's Celery processes, served on
    ``port``; yields the environment the processes need (``PROMETHEUS_MULTIPROC_DIR``) and removes
    the folder at the end (one it made). ``PROMETHEUS_MULTIPROC_DIR`` already set: that folder,
    emptied of its ``.db`` files. Port 0: nothing (an empty environment)."""
    if not port:
        yield {}
        return
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="stylequeue-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(path))
    try:
        httpd = serve(port, registry, token)  # a port in use: OSError, the folder removed
        try:
            yield {MULTIPROC_ENV: str(path)}
        finally:
            httpd.shutdown()
            httpd.server_close()
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)


# --- the dispatcher: jobs by status and tenant, workers, from the database ---------------------------


@dataclass
class Snapshot:
    ok: bool = False
    seconds: float = 0.0
    active: Tally[tuple[str, str]] = field(default_factory=Tally)  # (status, tenant id)
    finished: Tally[tuple[str, str]] = field(default_factory=Tally)
    names: dict[str, str] = field(default_factory=dict)  # tenant id -> name (the top tenants)
    oldest_queued_s: float = 0.0
    workers: Tally[str] = field(default_factory=Tally)
    slots: Tally[str] = field(default_factory=Tally)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def read_snapshot(session: Session, *, lease_s: float, top: int = TOP_TENANTS) -> Snapshot:
    """One set of queries: jobs queued and running, jobs finished in the last ``RECENT_S``, the
    oldest queued job, the live workers and their slots."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {int(QUERY_TIMEOUT_MS)}"))
    now = utcnow()
    recent = now - timedelta(seconds=RECENT_S)
    snap = Snapshot(ok=True)
    snap.active = _job_counts(session, Job.status.in_(ACTIVE))
    ended = (Job.status.in_(sorted(TERMINAL)), Job.updated_at >= recent, Job.finished_at >= recent)
    snap.finished = _job_counts(session, *ended)  # updated_at: the index; finished_at: the meaning
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))
    snap.oldest_queued_s = max(0.0, (now - aware(oldest)).total_seconds()) if oldest else 0.0
    live = select(Worker.status, func.count(), func.sum(Worker.slots)).where(
        Worker.heartbeat_at >= now - timedelta(seconds=lease_s)
    )
    for worker_status, n, slots in session.execute(live.group_by(Worker.status)):
        snap.workers[worker_status], snap.slots[worker_status] = n, int(slots or 0)
    snap.names = _top_tenants(session, (*snap.active.items(), *snap.finished.items()), top)
    return snap


def _job_counts(session: Session, *where: ColumnElement[bool]) -> Tally[tuple[str, str]]:
    by = (Job.status, Job.tenant_id)
    rows = session.execute(select(*by, func.count()).where(*where).group_by(*by))
    return Tally({(str(status), tenant): n for status, tenant, n in rows})


def _top_tenants(session: Session, counts: Iterable[tuple[tuple[str, str], int]], top: int) -> dict[str, str]:
    """Name by id of the ``top`` tenants with the most jobs counted (an id where it has no name)."""
    totals = Tally[str]()
    for (_, tenant), n in counts:
        totals[tenant] += n
    ids = [tenant for tenant, _ in totals.most_common(top)]
    if not ids:
        return {}
    rows = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids)))
    names = {tenant_id: name for tenant_id, name in rows}
    return {i: names.get(i, i) for i in ids}


def _by_tenant(name: str, doc: str, counts: Tally[tuple[str, str]], names: dict[str, str]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["status", "tenant"])
    bounded = Tally[tuple[str, str]]()
    for (status, tenant), n in counts.items():
        bounded[(status, names.get(tenant, OTHER))] += n
    for (status, tenant), n in sorted(bounded.items()):
        family.add_metric([status, tenant], n)
    return family


class JobsCollector(Collector):
    """The dispatcher's gauges, read from the database when scraped (see the module's docstring)."""

    def __init__(self, sessions: sessionmaker[Session], *, lease_s: float, top: int = TOP_TENANTS) -> None:
        self.sessions, self.lease_s, self.top = sessions, lease_s, top
        self._lock = threading.Lock()
        self._last: Snapshot | None = None
        self._at = 0.0

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._last is not None and time.monotonic() - self._at < MIN_INTERVAL_S:
                return self._last
            started = time.monotonic()
            try:
                with self.sessions() as session:
                    snap = read_snapshot(session, lease_s=self.lease_s, top=self.top)
            except (SQLAlchemyError, OSError) as exc:
                logs.event(logger, "metrics_query_failed", kind="metrics", level=logging.WARNING, error=exc)
                snap = Snapshot(ok=False)
            snap.seconds = time.monotonic() - started
            self._last, self._at = snap, time.monotonic()
            return snap

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        yield GaugeMetricFamily(
            "stylequeue_db_metrics_up", "1 if the last read of the database gauges worked", value=int(snap.ok)
        )
        yield GaugeMetricFamily(
            "stylequeue_db_metrics_query_seconds", "How long the last read of the gauges took", snap.seconds
        )
        if snap.ok:
            yield from _families(snap)


def _families(snap: Snapshot) -> Iterator[Metric]:
    depth = GaugeMetricFamily("stylequeue_jobs", "Jobs queued or running now", labels=["status"])
    for status in ACTIVE:
        depth.add_metric([status.value], sum(n for (s, _), n in snap.active.items() if s == status))
    yield depth
    yield _by_tenant(
        "stylequeue_tenant_jobs", "Jobs queued or running now, by tenant", snap.active, snap.names
    )
    yield _by_tenant(
        "stylequeue_jobs_finished_last_hour",
        "Jobs that ended in the last hour, by final status and tenant",
        snap.finished,
        snap.names,
    )
    yield GaugeMetricFamily(
        "stylequeue_jobs_oldest_queued_age_seconds",
        "Age of the oldest queued job (since it was submitted); 0 when none waits",
        snap.oldest_queued_s,
    )
    workers = GaugeMetricFamily("stylequeue_workers", "Live worker processes by status", labels=["status"])
    slots = GaugeMetricFamily("stylequeue_workers_slots", "Slots of the live workers", labels=["status"])
    for worker_status in sorted(snap.workers):
        workers.add_metric([worker_status], snap.workers[worker_status])
        slots.add_metric([worker_status], snap.slots[worker_status])
    yield workers
    yield slots


def serve_dispatcher_metrics(
    sessions: sessionmaker[Session], *, port: int, token: str, lease_s: float
) -> WSGIServer:
    """``stylequeue dispatch``'s ``/metrics`` (``STYLEQUEUE_DISPATCHER_METRICS_PORT``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(sessions, lease_s=lease_s))
    ProcessCollector(registry=registry)
    return serve(port, registry, token)


__all__ = [
    "JobsCollector",
    "Snapshot",
    "bearer_ok",
    "host_metrics",
    "read_snapshot",
    "serve",
    "serve_dispatcher_metrics",
]
