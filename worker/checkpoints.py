"""A running attempt's checkpoints: the one it resumes from, and the uploads of new ones.

The engine's ``on_checkpoint`` (``CheckpointSaver.__call__``) only hands the checkpoint (the engine
passes CPU copies) to the attempt's one uploader thread and returns, so the optimisation loop never
waits on storage. The thread serialises it, uploads ``<step>.pt``, a ``<step>.png`` preview and its
small JPEG thumbnail (``worker.thumbs``: encoded here too, never in the loop), records the reference
(fenced by the attempt) and deletes the objects of refs beyond the latest ``keep``
(``settings.checkpoints_keep``).

Latest only: a checkpoint still waiting when a newer one arrives is dropped (the newer one holds all
of its work); one being uploaded finishes. An upload that fails is logged and the next checkpoint
tries again; nothing from the thread reaches the engine, except a fenced record, which sets the
watcher's ``stop`` (the loop sees it at its next ``on_progress``). Leaving the saver's ``with`` block
settles it: after a run, a crash or a shutdown what is waiting is uploaded first (a hand-back then
releases the job at the checkpoint it asked for, losing no work); after a cancel or a fence it is
dropped (the job is no longer this attempt's to write).
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from PIL import Image

from shared import logs, storage_keys
from shared.models import utcnow
from shared.storage import ObjectNotFound, Storage
from worker import jobstore
from worker.engine import Checkpoint, EngineError
from worker.engine.images import tensor_to_pil
from worker.thumbs import thumbnail
from worker.watcher import StopReason, Watcher

logger = logging.getLogger(__name__)

# Settling waits this long for the uploads: shared.storage's S3 timeouts and retries bound one PUT
# to well under it, so only a storage that hangs past its own timeouts makes a hand-back lose work.
FLUSH_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 30.0  # then for the upload in progress, once the waiting one is dropped
# Stops after which waiting uploads are dropped: a newer attempt or the API owns the job now.
DROP_ON = frozenset({StopReason.CANCELED, StopReason.FENCED})


def log_event(job_id: str, attempt: int | None, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One worker event in the service's log shape (shared.logs)."""
    logs.event(logger, event, job_id=job_id, attempt=attempt, level=level, **fields)


def resume_point(storage: Storage, claim: jobstore.Claim) -> tuple[Checkpoint | None, int]:
    """The latest recorded checkpoint, or (None, 0) when there is none or it cannot be read."""
    if not claim.checkpoints:
        return None, 0
    ref = claim.checkpoints[-1]
    try:
        ckpt = Checkpoint.from_bytes(storage.get_bytes(ref["key"]))
    except (ObjectNotFound, EngineError, ValueError, KeyError) as exc:
        log_event(claim.job_id, claim.attempt, "resume_skipped", logging.WARNING, error=exc)
        return None, 0
    log_event(claim.job_id, claim.attempt, "resuming", step=ref.get("step"))
    return ckpt, int(ref.get("step") or 0)


class CheckpointSaver:
    """``on_checkpoint`` for one attempt, with its uploader thread (use as a context manager)."""

    def __init__(
        self,
        storage: Storage,
        url: str,
        claim: jobstore.Claim,
        watcher: Watcher,
        keep: int,
        *,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self.storage, self.url, self.claim, self.watcher = storage, url, claim, watcher
        self.keep, self.flush_timeout_s = keep, flush_timeout_s
        self.last_step: int | None = None  # the latest checkpoint this attempt recorded
        self._cond = threading.Condition()
        self._waiting: Checkpoint | None = None  # handed over, not started (guarded by _cond)
        self._busy = False  # an upload in progress (guarded by _cond)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"ckpt-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> CheckpointSaver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(settle=self.watcher.stop not in DROP_ON)

    # --- engine side (the engine's thread: never waits on storage) ---
    def __call__(self, ckpt: Checkpoint) -> None:
        self.watcher.cadence.taken()  # the time-based cadence counts from the latest checkpoint
        with self._cond:
            dropped, self._waiting = self._waiting, ckpt
            self._cond.notify_all()
        if dropped is not None:
            self._log("checkpoint_superseded", logging.DEBUG, step=int(dropped.step), by=int(ckpt.step))
        self.watcher.raise_if_stopped()  # a shutdown's checkpoint is handed over: stop the run now

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is waiting or being uploaded; False when ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting is None and not self._busy, timeout)

    def close(self, settle: bool = True) -> None:
        """Upload what is waiting first (``settle``) or drop it, then end the thread once the upload in
        progress is done. A thread still stuck in storage after that is left behind (a daemon): its
        writes are fenced by the attempt, so once the job moved on they change nothing."""
        if settle and not self.flush(self.flush_timeout_s):
            self._log("checkpoint_flush_timeout", logging.WARNING, timeout_s=self.flush_timeout_s)
        with self._cond:
            self._closing = True
            dropped, self._waiting = self._waiting, None
            self._cond.notify_all()
        if dropped is not None:
            stop = self.watcher.stop
            self._log("checkpoint_dropped", step=int(dropped.step), stop=stop.value if stop else None)
        if self._thread.ident is not None:  # started
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                self._log("checkpoint_upload_stuck", logging.ERROR, timeout_s=JOIN_TIMEOUT_S)

    # --- uploader thread ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closing)
                ckpt, self._waiting = self._waiting, None
                if ckpt is None:  # closing, nothing left to upload
                    return
                self._busy = True
            try:
                self._upload(ckpt)
            except Exception as exc:  # noqa: BLE001 - storage or DB blip: the next checkpoint retries
                self._log(
                    "checkpoint_failed",
                    logging.WARNING,
                    step=int(ckpt.step),
                    error=type(exc).__name__,
                    detail=repr(str(exc)[:200]),
                )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, ckpt: Checkpoint) -> None:
        job_id, attempt = self.claim.job_id, self.claim.attempt
        step = int(ckpt.step)
        key = storage_keys.checkpoint_key(job_id, step)
        self.storage.put_bytes(key, ckpt.to_bytes(), storage_keys.CHECKPOINT_MEDIA_TYPE)
        ref = {
            "key": key,
            **self._put_images(job_id, step, tensor_to_pil(ckpt.image)),
            "scale": int(ckpt.scale),
            "iteration": int(ckpt.iteration),
            "step": step,
            "end_of_scale": bool(ckpt.end_of_scale),
            "at": utcnow().isoformat(),
        }
        recorded = jobstore.append_checkpoint(self.url, job_id, attempt, ref, self.keep)
        fields: dict[str, Any] = {"step": step, "scale": ref["scale"]}
        if recorded is None:  # fenced out: a newer attempt owns the list, delete nothing
            self.watcher.stop = self.watcher.stop or StopReason.FENCED
        else:
            self.last_step = step
            fields.update(seq=recorded.ref["seq"], pruned=self._delete(recorded.garbage))
        asked = self.watcher.checkpoint_requested_at
        if asked is not None and step >= asked:
            fields["reason"] = "shutdown"
        log_event(job_id, attempt, "checkpoint", **fields)

    def _put_images(self, job_id: str, step: int, image: Image.Image) -> dict[str, str]:
        """Store the checkpoint's full-size PNG preview and its small thumbnail: their ref fields."""
        preview_at, thumb_at = storage_keys.preview_key(job_id, step), storage_keys.thumb_key(job_id, step)
        preview = io.BytesIO()
        image.save(preview, format="PNG")
        self.storage.put_bytes(preview_at, preview.getvalue(), storage_keys.PREVIEW_MEDIA_TYPE)
        self.storage.put_bytes(thumb_at, thumbnail(image), storage_keys.THUMB_MEDIA_TYPE)
        return {"preview_key": preview_at, "thumb_key": thumb_at}

    def _delete(self, keys: list[str]) -> int:
        """Best effort: a delete that fails is logged (the object is left behind), never raised."""
        deleted = 0
        for key in keys:
            try:
                self.storage.delete(key)
                deleted += 1
            except Exception as exc:  # noqa: BLE001 - pruning is best effort; the next prune retries
                self._log(
                    "checkpoint_delete_failed",
                    logging.WARNING,
                    key=key,
                    error=type(exc).__name__,
                    detail=repr(str(exc)[:200]),
                )
        return deleted

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(self.claim.job_id, self.claim.attempt, event, level, **fields)
