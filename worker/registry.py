"""A Celery worker's row in ``workers`` (``shared.workers``): a start-up check, then a heartbeat.

In Celery's main process, before the pool forks and before anything is consumed
(``celeryd_after_setup``, see ``worker.tasks``):

1. ``worker.startup_check`` loads the weights (``STYLEQUEUE_WEIGHTS``) once in a short subprocess with
   CUDA hidden, so this process never initialises CUDA (prefork forks later, see ``worker.runtime``),
   and looks for the device (``STYLEQUEUE_DEVICE``) without CUDA.
2. They cannot be had: the row is registered ``unhealthy`` with the remedy in ``detail``,
   ``worker_refused`` is logged, the remedy is written to stderr and the handler raises
   ``SystemExit(2)``. Celery then stops before its pool or consumer start and exits 2; ``stylequeue
   worker`` (its supervisor) stops its other workers and exits 2 too.
3. They can: the row is registered ``starting`` (slots = the concurrency, device, weights source,
   capabilities) and beaten every ``heartbeat_s`` by a daemon thread; ``healthy`` once Celery consumes
   (``worker_ready``), ``stopping`` on a warm shutdown, removed when the worker has stopped.

A pool process whose engine fails to load later (``runtime.preload``) marks the row ``unhealthy``; the
heartbeat sees it and stops the worker (warm, exit 2), so that it never drains the queue failing jobs.
An unhealthy row is left in place, with its detail, for ``/v1/status`` and ``/readyz`` to show.

Fork safety: the heartbeat has its own engine without a pool (one connection per beat), and a lock that
``os.register_at_fork`` takes before each fork: a pool process never inherits a connection in use.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from shared import dispatch, logs, workers
from shared.queue import get_celery, publish_many
from shared.settings import Settings, get_settings
from shared.workers import WorkerStatus
from worker.batch import batch_limit
from worker.startup_check import WeightsCheck, capabilities, check_weights, device_of, engine_detail

logger = logging.getLogger(__name__)

EXIT_REFUSED = 2  # as ``stylequeue worker``'s other configuration refusals (shared.server_cli)
FORK_WAIT_S = 10.0  # a fork waits this long at most for a beat in progress

_fork_lock = threading.Lock()
_fork_held = False
_fork_guarded = False
_active: Registration | None = None


def _private_engine(url: str) -> Engine:
    """No pool: nothing open between beats, so nothing for a forked pool process to inherit."""
    if url.startswith("sqlite"):
        return create_engine(
            url, poolclass=NullPool, connect_args={"check_same_thread": False, "timeout": 30}
        )
    args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        args = {"connect_timeout": 3, "options": "-c statement_timeout=5000", "tcp_user_timeout": 10_000}
    return create_engine(url, poolclass=NullPool, connect_args=args)


def _before_fork() -> None:
    global _fork_held
    _fork_held = _fork_lock.acquire(timeout=FORK_WAIT_S)


def _after_fork_in_parent() -> None:
    global _fork_held
    if _fork_held:
        _fork_held = False
        _fork_lock.release()


def _after_fork_in_child() -> None:
    global _fork_lock, _fork_held
    _fork_lock, _fork_held = threading.Lock(), False


def _guard_forks() -> None:
    global _fork_guarded
    if not _fork_guarded:
        os.register_at_fork(
            before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
        )
        _fork_guarded = True


class Registration:
    """This worker's row: written through ``shared.workers``, beaten from a daemon thread."""

    def __init__(self, settings: Settings, node: str, slots: int, device: str, device_kind: str) -> None:
        self.settings, self.node, self.slots = settings, node, max(1, slots)
        self.device, self.device_kind = device, device_kind
        self.host = socket.gethostname()
        self.weights: str = settings.weights
        self.weights_kind: str | None = None
        self.status = WorkerStatus.STARTING
        self.detail: str | None = None
        self._engine = _private_engine(settings.database_url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a transition to write now
        self._thread: threading.Thread | None = None
        self.on_unhealthy: Callable[[], None] = stop_worker

    def write(self, fn: Callable[[Session], Any]) -> Any:
        with _fork_lock, Session(self._engine) as session:
            out = fn(session)
            session.commit()
            return out

    def _register(self, session: Session) -> None:
        workers.register(
            session,
            node=self.node,
            host=self.host,
            device=self.device,
            weights=self.weights[:300],
            capabilities=capabilities(
                self.device_kind, self.weights_kind, batch_limit(get_settings(), self.device_kind)
            ),
            slots=self.slots,
            status=self.status,
            detail=self.detail,
        )

    def _sync(self, session: Session) -> WorkerStatus:
        """One beat: the row's status (re-registered if gone; brought to ours unless unhealthy)."""
        if self._stop.is_set():  # closed (under the same lock): never register again
            return self.status
        if not workers.beat(session, self.node):
            self._register(session)
            return self.status
        current = workers.status_of(session, self.node) or self.status
        if current not in (self.status, WorkerStatus.UNHEALTHY):
            workers.set_status(session, self.node, self.status, self.detail, only_from=(current,))
            return self.status
        return current

    def refuse(self, detail: str) -> NoReturn:
        """Register ``unhealthy`` (if the database lets us), log and say why, exit 2."""
        self.status, self.detail = WorkerStatus.UNHEALTHY, detail
        try:
            self.write(self._register)
        except Exception as exc:  # noqa: BLE001 - the refusal stands; the log says both
            logs.event(logger, "worker_register_failed", kind="worker", level=logging.ERROR, error=exc)
        logs.event(
            logger, "worker_refused", kind="worker", level=logging.ERROR, node=self.node, detail=detail
        )
        sys.stderr.write(f"stylequeue worker {self.node}: refusing to start: {detail}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_REFUSED)

    def start(self, check: WeightsCheck) -> None:
        """Register ``starting`` and start beating."""
        self.weights, self.weights_kind = check.source, check.kind
        self.write(self._register)
        _guard_forks()
        self._thread = threading.Thread(target=self._beat_forever, name="worker-heartbeat", daemon=True)
        self._thread.start()
        logs.event(
            logger,
            "worker_registered",
            kind="worker",
            node=self.node,
            slots=self.slots,
            device=self.device,
            weights=self.weights,
        )

    def transition(self, status: WorkerStatus) -> None:
        """Move to ``status`` (healthy, stopping) unless the row became unhealthy meanwhile. Written by
        the heartbeat thread at once: this may run in a signal handler, which must not wait on I/O."""
        if self.status is not WorkerStatus.UNHEALTHY:
            self.status = status
            self._wake.set()

    def mark_unhealthy(self, detail: str) -> None:
        """From a pool process: its engine cannot run jobs."""
        self.write(lambda s: workers.set_status(s, self.node, WorkerStatus.UNHEALTHY, detail))

    def _seen(self, status: WorkerStatus) -> None:
        if status is WorkerStatus.UNHEALTHY and self.status is not WorkerStatus.UNHEALTHY:
            self.status = WorkerStatus.UNHEALTHY
            logs.event(
                logger,
                "worker_unhealthy",
                kind="worker",
                level=logging.ERROR,
                node=self.node,
                action="stopping: a pool process could not load the engine (see its log)",
            )
            self.on_unhealthy()

    def _beat_forever(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.wait(self.settings.heartbeat_s)
            self._wake.clear()
            try:
                status = self.write(self._sync)
            except Exception as exc:  # noqa: BLE001 - the database may be down; keep beating
                if not failing:
                    logs.event(logger, "worker_beat_failed", kind="worker", level=logging.WARNING, error=exc)
                failing = True
                continue
            if failing:
                logs.event(logger, "worker_beat_recovered", kind="worker", node=self.node)
                failing = False
            self._seen(status)
            self._ask_for_work()

    def _ask_for_work(self) -> None:
        """A healthy worker asks for work every beat: one dispatch pass, which returns at once unless
        a slot is free with no message on its way (a job waiting while no dispatcher runs, or a
        worker that just joined)."""
        if self.status is not WorkerStatus.HEALTHY:
            return
        try:
            with _fork_lock:
                app = get_celery()
                publish = lambda ids: publish_many(app, ids)  # noqa: E731 - one line, one use
                dispatch.dispatch_once(self._sessions, publish, self.settings, wait=False)
        except Exception as exc:  # noqa: BLE001 - the dispatcher's own passes cover for this one
            logs.event(logger, "worker_dispatch_failed", kind="worker", level=logging.WARNING, error=exc)

    def close(self) -> None:
        """Stop beating; remove the row unless it says why this worker is unhealthy."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=FORK_WAIT_S)
        if self.status is not WorkerStatus.UNHEALTHY:
            try:
                self.write(lambda s: workers.unregister(s, self.node))
            except Exception as exc:  # noqa: BLE001 - its heartbeat stops: it is lost within lease_s
                logs.event(
                    logger, "worker_unregister_failed", kind="worker", level=logging.WARNING, error=exc
                )
        self._engine.dispose()


def stop_worker() -> None:
    """A warm shutdown of this Celery worker, exit code 2 (read by its event loop)."""
    from celery.worker import state

    state.should_stop = EXIT_REFUSED


def start_up(settings: Settings, node: str, slots: int) -> Registration:
    """Check the device, then the weights; register ``starting`` and beat, or refuse (``SystemExit(2)``)."""
    global _active
    device, kind, problem = device_of(settings.device)
    registration = Registration(settings, node, slots, device, kind)
    if problem is not None:
        registration.refuse(problem)
    check = check_weights(settings.weights)
    detail = check.detail()
    if detail is not None:
        registration.refuse(detail)
    registration.start(check)
    _active = registration
    return registration


# --- Celery signal handlers (connected in worker.tasks) ---


def on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """``celeryd_after_setup`` (main process, before the pool and the consumer start)."""
    node = str(getattr(instance, "hostname", None) or sender or f"worker@{socket.gethostname()}")
    # node#pid: two workers started with the same node name (two `--cpu` workers on one host) are
    # two rows, each with its own slots.
    start_up(get_settings(), f"{node}#{os.getpid()}", int(getattr(instance, "concurrency", 1) or 1))


def on_ready(**_: Any) -> None:
    """``worker_ready``: consuming now."""
    if _active is not None:
        _active.transition(WorkerStatus.HEALTHY)


def on_shutting_down(**_: Any) -> None:
    """``worker_shutting_down`` (a signal to stop): no new jobs for this worker."""
    if _active is not None:
        _active.transition(WorkerStatus.STOPPING)


def on_shutdown(**_: Any) -> None:
    """``worker_shutdown``: the pool has stopped."""
    global _active
    if _active is not None:
        _active.close()
        _active = None


def engine_failed(exc: BaseException) -> None:
    """``runtime.preload``'s ``on_error``, in a pool process: mark the row unhealthy."""
    registration = _active
    if registration is None:
        return
    detail = engine_detail(registration.settings.weights, exc)
    try:
        registration.mark_unhealthy(detail)
    except Exception as err:  # noqa: BLE001 - the job that needs the engine fails and says why
        logs.event(logger, "worker_mark_unhealthy_failed", kind="worker", level=logging.ERROR, error=err)
        return
    logs.event(logger, "worker_marked_unhealthy", kind="worker", level=logging.ERROR, detail=detail)
