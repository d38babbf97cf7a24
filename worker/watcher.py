"""The watcher that runs beside the engine: heartbeat, progress, cancellation and fencing.

The engine's ``on_progress`` callback only hands the latest ``Progress`` over and raises if the
watcher says stop, so the optimisation loop never waits on the database. A background thread:

* every ``poll_s`` (0.5 s) reads status / cancel flag / attempt: a cancel, a newer attempt or a
  worker shutdown sets ``stop`` (a running job sees a cancel within about a second);
* every ``progress_interval_s`` writes the latest progress (with the heartbeat);
* every ``heartbeat_s`` at least, writes the heartbeat.

On a worker shutdown (SIGTERM, warm) the job is not dropped at once: ``on_progress`` returns the
engine's ``CHECKPOINT_NOW``, so the engine checkpoints the current iteration and the hand-back loses
no work; the checkpoint callback then stops the run (and the runner waits for that checkpoint's
upload before it releases the job). Were no checkpoint written, the job is stopped at its next
iteration anyway.

``on_progress`` also returns ``CHECKPOINT_NOW`` once ``checkpoint_interval_s`` of wall time passed
since the attempt's last checkpoint (or its start): a checkpoint cadence in time, whatever an
iteration costs at that size and on that device (``CheckpointCadence``).
"""

from __future__ import annotations

import enum
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from shared import logs
from shared.jobs import JobStatus
from shared.settings import Settings
from worker import jobstore
from worker.engine import CHECKPOINT_NOW, Progress
from worker.loss_history import LossHistory

logger = logging.getLogger(__name__)

POLL_S = 0.5


class StopReason(str, enum.Enum):
    CANCELED = "canceled"
    FENCED = "fenced"  # a newer attempt holds the job, or it is no longer running
    SHUTDOWN = "shutdown"  # this worker is stopping: hand the job back


class JobStopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside an engine callback to end ``run()`` early."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class ShutdownFlag:
    """One byte of anonymous shared memory, made at import in Celery's main process, so the pool
    processes it forks see it when the main process sets it on a warm shutdown (no signals reach the
    pool processes, whose SIGTERM handling billiard owns)."""

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork()

    def set(self) -> None:
        self._mem[0] = 1

    def clear(self) -> None:
        self._mem[0] = 0

    def is_set(self) -> bool:
        return self._mem[0] == 1


SHUTDOWN = ShutdownFlag()


def progress_dict(
    p: Progress,
    started: float,
    start_step: int,
    pace: tuple[float, int] | None = None,
    edges: list[int] | None = None,
) -> dict[str, Any]:
    """``job.progress`` from an engine ``Progress``.

    ETA: with ``pace`` (when this scale started, iterations done before that) and the scales' long
    ``edges``, the current scale's seconds per iteration, scaled by pixel count for later scales
    (a scale of twice the edge costs about four times as much); else this attempt's average rate.
    """
    total = max(int(p.total_steps), 1)
    step = min(int(p.step), total)
    now = time.monotonic()
    eta = _paced_eta(p, step, total, now, pace, edges)
    if eta is None and step > start_step:
        eta = (total - step) * (now - started) / (step - start_step)
    return {
        "scale": int(p.scale),
        "scales": int(p.scales),
        "iteration": int(p.iteration),
        "iterations": int(p.iterations),
        "step": step,
        "total_steps": total,
        "fraction": round(step / total, 4),
        # PostgreSQL's JSON cannot hold NaN: a non-finite loss (a step the NaN guard undoes) is null
        "loss": float(p.loss) if p.loss is not None and math.isfinite(p.loss) else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


def final_progress(latest: dict[str, Any] | None, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A finished job's progress: the latest its attempt reported, as done; for an attempt with none
    (it resumed from its last scale's end: nothing left to run), the run's own totals."""
    if latest is None:
        iterations = list(metadata.get("iterations") or [0])
        last = {"scale": len(iterations) - 1, "iteration": iterations[-1], "iterations": iterations[-1]}
        latest = {**last, "scales": len(iterations), "total_steps": metadata.get("steps"), "loss": None}
    final = {**latest, "fraction": 1.0, "eta_seconds": 0.0}
    final["step"] = final.get("total_steps", final.get("step"))
    return final


def _paced_eta(
    p: Progress, step: int, total: int, now: float, pace: tuple[float, int] | None, edges: list[int] | None
) -> float | None:
    if pace is None or not edges or len(edges) != int(p.scales):
        return None
    scale_t0, done_before = pace
    done_here = int(p.iteration) - done_before
    if done_here <= 0:
        return None
    per_it = (now - scale_t0) / done_here
    left_here = int(p.iterations) - int(p.iteration)
    later = edges[int(p.scale) + 1 :]
    left_later = max(total - step - left_here, 0)
    cost = sum((e / edges[int(p.scale)]) ** 2 for e in later) / len(later) if later else 0.0
    return per_it * (left_here + left_later * cost)


class CheckpointCadence:
    """Time-based checkpoints: one is due once ``interval_s`` of wall time (``clock``) passed since the
    attempt's last checkpoint or its start; ``interval_s`` 0 turns it off (scale ends and requests)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = max(interval_s, 0.0), clock
        self.last = clock()

    def due(self) -> bool:
        return self.interval_s > 0 and self.clock() - self.last >= self.interval_s

    def taken(self) -> None:
        """A checkpoint was made (whatever asked for it): the next one is due an interval from now."""
        self.last = self.clock()


class Watcher:
    """Heartbeat and control thread for one claimed job (use as a context manager)."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        attempt: int,
        start_step: int = 0,
        edges: list[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = settings.database_url
        self.job_id, self.attempt = job_id, attempt
        self.progress_s = max(settings.progress_interval_s, 0.05)
        self.heartbeat_s = max(settings.heartbeat_s, 0.05)
        self.poll_s = min(POLL_S, self.progress_s, self.heartbeat_s)
        self.started = time.monotonic()
        self.start_step = start_step
        self.history = LossHistory()  # progress["history"]: the web page's loss curve
        self.edges = edges
        self._pace: tuple[float, int] | None = None
        self._pace_scale = -1
        self._last_t: float | None = self.started
        self.stop: StopReason | None = None
        # On shutdown: ask for a checkpoint of the current iteration before stopping (see above).
        self.checkpoint_requested_at: int | None = None  # the step at which it was asked for
        self.cadence = CheckpointCadence(settings.checkpoint_interval_s, clock)
        self._latest: Progress | None = None
        self._written: Progress | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watch-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (heartbeats end): idempotent, so a group may end a member's early."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # --- engine side (called in the engine's thread, cheap) ---
    def on_progress(self, p: Progress) -> str | None:
        if p.waiting:  # a group's member that ended its scale waits for the others: nothing new,
            self.raise_if_stopped()  # but a cancel (or shutdown: its scale's end is saved) ends it now
            return None
        if p.scale != self._pace_scale:  # a new scale: its own pace (previous iteration's end)
            self._pace_scale, self._pace = p.scale, (self._last_t or time.monotonic(), p.iteration - 1)
        self._last_t = time.monotonic()
        self._latest = p
        self.history.add(int(p.scale), int(p.iteration), p.loss)
        if self._shutdown_checkpoint_pending(int(p.step)):
            # The engine checkpoints this iteration; the checkpoint callback then stops the run.
            return CHECKPOINT_NOW
        self.raise_if_stopped()
        # The engine checkpoints this iteration; the checkpoint callback restarts the cadence.
        return CHECKPOINT_NOW if self.cadence.due() else None

    def _shutdown_checkpoint_pending(self, step: int) -> bool:
        """On shutdown, ask once for a checkpoint at ``step`` and keep going until it is saved."""
        if self.stop is None and SHUTDOWN.is_set():
            self.stop = StopReason.SHUTDOWN
        if self.stop is not StopReason.SHUTDOWN:
            return False
        if self.checkpoint_requested_at is None:
            self.checkpoint_requested_at = step
            return True
        return False  # asked already and the engine moved on without one: stop now

    def raise_if_stopped(self) -> None:
        if self.stop is None and SHUTDOWN.is_set():
            self.stop = StopReason.SHUTDOWN
        if self.stop is not None:
            raise JobStopped(self.stop)

    def progress_now(self) -> dict[str, Any] | None:
        p = self._latest
        if p is None:
            return None
        return {
            **progress_dict(p, self.started, self.start_step, self._pace, self.edges),
            "history": self.history.points(),
        }

    # --- watcher thread ---
    def _loop(self) -> None:
        last_write = last_beat = time.monotonic()
        while not self._done.wait(self.poll_s):
            try:
                now = time.monotonic()
                self._check()
                latest = self._latest
                due_progress = latest is not None and latest is not self._written
                if due_progress and now - last_write >= self.progress_s:
                    ok = jobstore.heartbeat(self.url, self.job_id, self.attempt, self.progress_now())
                    self._written, last_write, last_beat = latest, now, now
                    self._note(ok)
                elif now - last_beat >= self.heartbeat_s:
                    self._note(jobstore.heartbeat(self.url, self.job_id, self.attempt))
                    last_beat = now
            except Exception:  # noqa: BLE001 - the database may blip; the lease covers a few missed beats
                logs.event(
                    logger, "watch_error", job_id=self.job_id, attempt=self.attempt, level=logging.WARNING
                )

    def _check(self) -> None:
        if self.stop is not None:
            return
        if SHUTDOWN.is_set():
            self.stop = StopReason.SHUTDOWN
            return
        snap = jobstore.snapshot(self.url, self.job_id)
        if snap is None:
            self.stop = StopReason.FENCED
        elif snap.cancel_requested or snap.status == JobStatus.CANCELED:
            self.stop = StopReason.CANCELED
        elif snap.attempt != self.attempt or snap.status != JobStatus.RUNNING:
            self.stop = StopReason.FENCED

    def _note(self, wrote: bool) -> None:
        if not wrote and self.stop is None:
            self._check()
            if self.stop is None:
                self.stop = StopReason.FENCED
