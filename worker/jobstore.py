"""The worker's side of a job row: claiming a delivery, then fenced writes by the attempt it took.

A delivery first *claims* the job: one guarded UPDATE moves it to ``running`` and bumps ``attempt``.
That new attempt number is a fencing token: every later write is
``UPDATE ... WHERE id = :id AND attempt = :mine AND status = 'running'`` and a write that changes no row
means a newer attempt (or a cancel) took the job over, so the caller stops quietly.

The SQL is ``shared.jobstore``'s (the one writer of job rows); this module decides what a delivery
does with the row it finds and gives each write its own transaction.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from shared import jobstore as jobrows
from shared.db import session_scope
from shared.jobs import JobStatus
from shared.models import Job, utcnow
from shared.storage_keys import CHECKPOINT_REF_KEYS

logger = logging.getLogger(__name__)


class Drop(str, enum.Enum):
    """Why a delivery was dropped (acknowledged without running)."""

    MISSING = "missing"
    TERMINAL = "terminal"
    LIVE_ELSEWHERE = "running_elsewhere"
    LOST_RACE = "lost_race"
    CANCELED = "canceled"
    EXHAUSTED = "attempts_exhausted"


@dataclass(frozen=True)
class Claim:
    """A job this worker now holds under ``attempt``, with the row as it was when claimed."""

    job_id: str
    attempt: int
    params: dict[str, Any]
    content_image_id: str
    style_image_ids: list[str]
    checkpoints: list[dict[str, Any]]
    mask_image_ids: list[str] | None = None  # one content mask per style, or None: no masks
    bucket: str | None = None  # shared.buckets: the jobs it may share a GPU batch with


@dataclass(frozen=True)
class Snapshot:
    status: JobStatus
    attempt: int
    cancel_requested: bool


def worker_identity(nodename: str) -> str:
    """``node@host#pid``: who holds a job, precise enough to tell a dead pool child from a live one."""
    return f"{nodename}#{os.getpid()}"


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time the service writes is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _holder_is_dead(holder: str | None, me: str) -> bool:
    """True when the recorded holder ran on this host and its process is gone (or is this process)."""
    if not holder or "#" not in holder:
        return False
    node, _, pid_text = holder.rpartition("#")
    my_node = me.rpartition("#")[0]
    host, my_host = node.partition("@")[2], my_node.partition("@")[2]
    if not pid_text.isdigit() or not host or host not in (my_host, socket.gethostname()):
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # a retry of our own attempt: the earlier run has ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _decide(job: Job, me: str, lease_s: float) -> Drop | None:
    status = JobStatus(job.status)
    if status.terminal:
        return Drop.TERMINAL
    if status is JobStatus.RUNNING:
        beat = as_utc(job.heartbeat_at)
        fresh = beat is not None and utcnow() - beat < timedelta(seconds=lease_s)
        if fresh and not _holder_is_dead(job.worker, me):
            return Drop.LIVE_ELSEWHERE
    if job.cancel_requested:
        return Drop.CANCELED
    if job.attempt >= job.max_attempts:
        return Drop.EXHAUSTED
    return None


def claim(url: str, job_id: str, me: str, lease_s: float) -> Claim | Drop:
    """Take the job for a new attempt, or say why this delivery must be dropped."""
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        if job is None:
            return Drop.MISSING
        reason = _decide(job, me, lease_s)
        if reason is Drop.CANCELED:
            jobrows.cancel_unheld(s, jobrows.Seen.of(job))
            return reason
        if reason is Drop.EXHAUSTED:
            jobrows.fail_lost(s, jobrows.Seen.of(job), job.max_attempts, handbacks=job.handbacks or 0)
            return reason
        if reason is not None:
            return reason
        attempt = jobrows.claim(s, job, me)
        if attempt is None:
            return Drop.LOST_RACE
        masks = None if job.mask_image_ids is None else list(job.mask_image_ids)
        return Claim(
            job_id,
            attempt,
            dict(job.params or {}),
            job.content_image_id,
            list(job.style_image_ids or []),
            list(job.checkpoints or []),
            masks,
            job.bucket,
        )


def heartbeat(url: str, job_id: str, attempt: int, progress: dict[str, Any] | None = None) -> bool:
    with session_scope(url) as s:
        return jobrows.heartbeat(s, job_id, attempt, progress)


def snapshot(url: str, job_id: str) -> Snapshot | None:
    with session_scope(url) as s:
        row = s.execute(select(Job.status, Job.attempt, Job.cancel_requested).where(Job.id == job_id)).first()
    return None if row is None else Snapshot(row[0], row[1], bool(row[2]))


@dataclass(frozen=True)
class Recorded:
    """A checkpoint reference as stored (with its ``seq``) and the objects no kept ref names any more."""

    ref: dict[str, Any]
    garbage: list[str]


def retain(
    current: list[dict[str, Any]], ref: dict[str, Any], keep: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """The refs to store after recording ``ref`` (the latest ``keep``, at least one) and the keys to delete.

    Every ref gets a stable ``seq``: one more than the largest before it (a ref stored without one
    counts as its list position). A ref with the same key as ``ref`` is replaced (same object). A key
    (the checkpoint, its preview, its thumbnail: ``CHECKPOINT_REF_KEYS``; a ref of an earlier version
    has no thumbnail) is garbage only when no kept ref names it.
    """
    numbered = [c if "seq" in c else {**c, "seq": i} for i, c in enumerate(current)]
    seq = max((int(c["seq"]) for c in numbered), default=-1) + 1
    refs = [c for c in numbered if c.get("key") != ref["key"]] + [{**ref, "seq": seq}]
    kept, dropped = refs[-max(keep, 1) :], refs[: -max(keep, 1)]
    live = {c.get(f) for c in kept for f in CHECKPOINT_REF_KEYS}
    garbage = [
        k
        for c in dropped
        for f in CHECKPOINT_REF_KEYS
        if isinstance(k := c.get(f), str) and k and k not in live
    ]
    return kept, list(dict.fromkeys(garbage))


def held_checkpoints(url: str, job_id: str, attempt: int) -> list[dict[str, Any]] | None:
    """The job's checkpoint list as stored now; ``None`` when ``attempt`` no longer holds it."""
    with session_scope(url) as s:
        row = s.execute(
            select(Job.checkpoints).where(
                Job.id == job_id, Job.attempt == attempt, Job.status == jobrows.HELD
            )
        ).first()
    return None if row is None else list(row[0] or [])


def append_checkpoint(url: str, job_id: str, attempt: int, ref: dict[str, Any], keep: int) -> Recorded | None:
    """Record an uploaded checkpoint, keeping the latest ``keep``; ``None`` when fenced out.

    Only the attempt holder writes the list, so read-then-write is safe. The caller deletes
    ``garbage`` only after this fenced write succeeded: a stale attempt gets ``None``, deletes nothing.
    """
    current = held_checkpoints(url, job_id, attempt)
    if current is None:
        return None
    refs, garbage = retain(current, ref, keep)
    with session_scope(url) as s:
        if not jobrows.record_checkpoints(s, job_id, attempt, refs):
            return None
    return Recorded(refs[-1], garbage)


def succeed(
    url: str,
    job_id: str,
    attempt: int,
    result_key: str,
    progress: dict[str, Any],
    execution: dict[str, Any] | None = None,
) -> bool:
    with session_scope(url) as s:
        return jobrows.succeed(s, job_id, attempt, result_key, progress, execution)


def fail(url: str, job_id: str, attempt: int, code: str, message: str, retryable: bool) -> bool:
    with session_scope(url) as s:
        return jobrows.fail(s, job_id, attempt, code, message, retryable)


def cancel(url: str, job_id: str, attempt: int) -> bool:
    with session_scope(url) as s:
        return jobrows.cancel(s, job_id, attempt)


def release(
    url: str,
    job_id: str,
    attempt: int,
    *,
    graceful: bool,
    message_due: datetime | None = None,
    waiting: bool = False,
    alone: bool = False,
) -> bool:
    """Give a running job back to the queue; graceful: not counted as an attempt (``shared.jobstore``)."""
    with session_scope(url) as s:
        return jobrows.release(
            s, job_id, attempt, graceful=graceful, message_due=message_due, waiting=waiting, alone=alone
        )


def fail_released(url: str, job_id: str, code: str, message: str) -> bool:
    """Fail a job given back to the queue whose retries are spent (no attempt holds it)."""
    with session_scope(url) as s:
        return jobrows.fail_released(s, job_id, code, message)
