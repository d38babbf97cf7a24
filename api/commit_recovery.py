"""Submissions whose COMMIT failed with the connection: were they committed or not?

When the database goes away while the COMMIT is in flight, the client is answered 503, yet the
transaction may have been made durable before the server died. Such a submission is "in doubt". To
keep the promise "a submission that failed created no job", the API remembers it here and, as soon as
the database answers again, deletes what it may have created: its jobs (only while still ``queued``
and unpublished, so never one that a reconciler already sent to a worker), its batch row and its
idempotency key row. A daemon thread retries every ``RETRY_S`` until nothing is left.

The record is in memory: an API process killed during an outage leaves such a job to run (it was
never published, so the reconciler publishes it after its grace period).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from shared import jobstore_queue, logs
from shared.models import Batch, IdempotencyKey, Job

logger = logging.getLogger(__name__)

RETRY_S = 1.0


@dataclass(frozen=True)
class Submission:
    """What one request is about to commit."""

    tenant_id: str
    job_ids: tuple[str, ...]
    batch_id: str | None = None
    key: str | None = None  # its Idempotency-Key, if any


def _key_row_is_ours(row: IdempotencyKey, job_ids: Sequence[str]) -> bool:
    body = row.response or {}
    answered = {body.get("id"), *body.get("job_ids", ())}
    return any(job_id in answered for job_id in job_ids)


def undo(session: Session, sub: Submission) -> bool:
    """Delete what ``sub`` may have committed; False if a job already left ``queued``/unpublished
    (then everything is kept: the job is real and its key replays it)."""
    ids = list(sub.job_ids)
    count = jobstore_queue.delete_unpublished(session, ids)
    left = session.scalar(select(Job.id).where(Job.id.in_(ids)).limit(1))
    if left is not None:
        session.rollback()
        logs.event(logger, "in_doubt_kept", job_id=left, level=logging.WARNING, reason="already_published")
        return False
    if sub.batch_id is not None:
        session.execute(
            delete(Batch).where(Batch.id == sub.batch_id, ~exists().where(Job.batch_id == sub.batch_id))
        )
    if sub.key is not None:
        row = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.tenant_id == sub.tenant_id, IdempotencyKey.key == sub.key
            )
        )
        if row is not None and _key_row_is_ours(row, ids):
            session.delete(row)
    session.commit()
    logs.event(
        logger,
        "in_doubt_resolved",
        job_id=ids[0] if ids else "-",
        level=logging.WARNING,
        committed=count > 0,
        deleted=count,
    )
    return True


class InDoubt:
    """The in-doubt submissions of this process, resolved in the background."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._pending: list[Submission] = []
        self._lock = threading.Lock()  # guards _pending and _thread
        self._resolving = threading.Lock()  # one resolution at a time
        self._thread: threading.Thread | None = None

    def add(self, sub: Submission) -> None:
        logs.event(
            logger,
            "commit_in_doubt",
            job_id=sub.job_ids[0] if sub.job_ids else "-",
            level=logging.ERROR,
            jobs=len(sub.job_ids),
        )
        with self._lock:
            self._pending.append(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="in-doubt", daemon=True)
                self._thread.start()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def resolve(self) -> int:
        """Try once to resolve everything pending; returns how many remain. Raises nothing."""
        with self._resolving:
            with self._lock:
                todo = list(self._pending)
            for sub in todo:
                try:
                    with self._sessions() as session:
                        undo(session, sub)
                except Exception as exc:  # noqa: BLE001 - still down, whatever the error: try again later
                    logs.event(logger, "in_doubt_retry", error=type(exc).__name__)
                    break
                with self._lock:
                    self._pending.remove(sub)
            return self.pending()

    def _run(self) -> None:
        while True:
            self.resolve()
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
            time.sleep(RETRY_S)


__all__ = ["InDoubt", "Submission", "undo"]
