"""Run one job delivery: claim, load inputs, run the engine, store checkpoints and the result.

Outcomes are returned as short strings (for the task's log and tests). Permanent errors (bad image,
bad parameters, missing weights: ``EngineError``) fail the job at once with the engine's code and
message; any other exception fails it with a generic message (its text is only logged); transient ones
(storage or database unreachable, broker connection) give the job back without using up an attempt
and propagate, so the Celery task retries with backoff (at most ``max_retries``). Attempts
(``max_attempts``) count only workers lost mid-job. Every write after the claim is fenced by the
attempt number. Only the latest ``checkpoints_keep`` checkpoints of a job are kept: older objects
are deleted once a newer reference is recorded.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from shared import dispatch, logs, storage_keys
from shared.db import get_sessionmaker
from shared.models import utcnow
from shared.queue import get_celery, publish_job, publish_many
from shared.settings import Settings
from shared.storage import ObjectNotFound, Storage, StorageUnavailable, open_storage
from worker import jobstore
from worker.config import job_params, load_input_image, transfer_config
from worker.engine import Checkpoint, EngineError, save_image
from worker.engine.schedule import long_edges
from worker.runtime import get_engine
from worker.watcher import JobStopped, StopReason, Watcher

if TYPE_CHECKING:
    from PIL import Image

    from worker.engine import TransferConfig
    from worker.engine_port import EnginePort, EngineResult

logger = logging.getLogger(__name__)

# Errors worth retrying later: the task declares these in ``autoretry_for``.
TRANSIENT: tuple[type[BaseException], ...] = (StorageUnavailable, OperationalError, ConnectionError)


def log_event(job_id: str, attempt: int | None, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One worker event in the service's log shape (shared.logs)."""
    logs.event(logger, event, job_id=job_id, attempt=attempt, level=level, **fields)


class Failure(Exception):
    """A permanent failure of this job, with its code."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


# Outcomes after which this worker's slot is free: a dispatch pass refills it at once.
FREES_SLOT = frozenset({"succeeded", "failed", "canceled", "fenced"})


def run_job(job_id: str, nodename: str, settings: Settings) -> str:
    """Handle one delivery of ``job_id``; returns the outcome (succeeded, failed, canceled, ...).
    When the job ends, a dispatch pass gives the freed slot its next job (``shared.dispatch``)."""
    outcome = _run_delivery(job_id, nodename, settings)
    if outcome in FREES_SLOT:
        _best_effort(job_id, 0, lambda: refill(settings))
    return outcome


def refill(settings: Settings) -> None:
    """One dispatch pass from the worker whose job just ended."""
    app = get_celery()
    dispatch.dispatch_once(
        get_sessionmaker(settings.database_url), lambda ids: publish_many(app, ids), settings
    )


def _run_delivery(job_id: str, nodename: str, settings: Settings) -> str:
    url = settings.database_url
    got = jobstore.claim(url, job_id, jobstore.worker_identity(nodename), settings.lease_s)
    if isinstance(got, jobstore.Drop):
        log_event(job_id, None, "dropped", reason=got.value)
        return f"dropped:{got.value}"
    log_event(job_id, got.attempt, "claimed", worker=nodename)
    try:
        return _execute(got, settings)
    except TRANSIENT as exc:
        log_event(
            job_id,
            got.attempt,
            "transient_error",
            logging.WARNING,
            error=type(exc).__name__,
            detail=str(exc)[:200],
        )
        # Not counted as an attempt (graceful): the task's max_retries bounds transient retries and
        # ends them with ``unavailable``. Counting them made a storage blip of under a second use up
        # all three attempts and fail the job as ``worker_lost`` (tests/faults, storage outage).
        due = utcnow() + timedelta(seconds=settings.retry_backoff_max_s)  # the retry's latest ETA
        _best_effort(
            job_id,
            got.attempt,
            lambda: jobstore.release(url, job_id, got.attempt, graceful=True, message_due=due),
        )
        raise
    except Failure as exc:
        return _fail(settings, got, exc.code, exc.message, exc.retryable)
    except EngineError as exc:
        return _engine_failed(settings, got, exc)
    except Exception as exc:  # noqa: BLE001 - any crash fails the job with a code; logged in full
        # Never the exception's text (torch internals, paths, SQL): a generic message with a code,
        # and the whole exception in the log under the job's id.
        code, message, retryable = _classify_crash(exc)
        logs.event(
            logger,
            "crash",
            job_id=job_id,
            attempt=got.attempt,
            level=logging.ERROR,
            exc_info=True,
            code=code,
            error=type(exc).__name__,
        )
        return _fail(settings, got, code, message, retryable)


def _execute(claim: jobstore.Claim, settings: Settings) -> str:
    storage = open_storage(settings)
    try:
        params = job_params(claim.params)
    except ValidationError as exc:
        raise Failure("invalid_params", f"the job's parameters are not valid: {_problems(exc)}") from exc
    config = transfer_config(params, settings)
    content, styles, inputs = _load_inputs(storage, claim, settings)
    resume, start_step = _resume_point(storage, claim)
    engine = get_engine(settings)
    edges = params.scales or long_edges(params.size, params.min_size, params.scale_factor)
    with Watcher(settings, claim.job_id, claim.attempt, start_step, list(edges)) as watcher:
        saver = CheckpointSaver(storage, settings.database_url, claim, watcher, settings.checkpoints_keep)
        log_event(claim.job_id, claim.attempt, "started", resume_step=start_step)
        try:
            result = _run_engine(engine, content, styles, config, watcher, saver, resume, inputs)
        except JobStopped as stop:
            return _stopped(settings, claim, stop.reason, saver.last_step)
        final = watcher.progress_now() or {}
    final.update(fraction=1.0, eta_seconds=0.0, step=final.get("total_steps", final.get("step")))
    # One key per attempt: an attempt that lost the job (a newer one took over) can never overwrite
    # the result the newer attempt recorded; it deletes its own object instead (below).
    key = storage_keys.result_key(claim.job_id, claim.attempt, params.output_format)
    # A newer attempt may hold the job by now (this one was presumed dead): never overwrite the
    # result it wrote or will write. (A fenced heartbeat: no row changed means not ours any more.)
    if not jobstore.heartbeat(settings.database_url, claim.job_id, claim.attempt):
        log_event(claim.job_id, claim.attempt, "fenced", stage="before_result")
        return "fenced"
    buf = io.BytesIO()
    save_image(result.image, buf, format=params.output_format, quality=params.quality)
    storage.put_bytes(key, buf.getvalue(), storage_keys.result_media_type(params.output_format))
    if not jobstore.succeed(settings.database_url, claim.job_id, claim.attempt, key, final):
        _best_effort(claim.job_id, claim.attempt, lambda: storage.delete(key))
        log_event(claim.job_id, claim.attempt, "fenced", stage="result")
        return "fenced"
    for earlier in range(1, claim.attempt):  # objects of attempts that died after uploading
        _best_effort(
            claim.job_id,
            claim.attempt,
            lambda a=earlier: storage.delete(storage_keys.result_key(claim.job_id, a, params.output_format)),
        )
    log_event(claim.job_id, claim.attempt, "succeeded", result_key=key)
    return "succeeded"


def _problems(exc: ValidationError) -> str:
    """Which fields are wrong and why, without pydantic's echo of the input or its links."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()[:5]
    )


class EngineInputs(TypedDict, total=False):
    """The optional inputs of ``EnginePort.run`` a job has (absent keys are not passed at all)."""

    masks: list[Image.Image]


def _run_engine(
    engine: EnginePort,
    content: Image.Image,
    styles: list[Image.Image],
    config: TransferConfig,
    watcher: Watcher,
    saver: CheckpointSaver,
    resume: Checkpoint | None,
    inputs: EngineInputs,
) -> EngineResult:
    """``engine.run`` (+ ``inputs``); a checkpoint it will not resume from is skipped (start afresh)."""
    try:
        return engine.run(
            content,
            styles,
            config,
            on_progress=watcher.on_progress,
            on_checkpoint=saver,
            resume=resume,
            **inputs,
        )
    except EngineError as exc:
        if resume is None or exc.code not in ("checkpoint_mismatch", "checkpoint_invalid"):
            raise
        log_event(saver.claim.job_id, saver.claim.attempt, "resume_skipped", logging.WARNING, error=exc.code)
        watcher.start_step = 0
        return engine.run(
            content,
            styles,
            config,
            on_progress=watcher.on_progress,
            on_checkpoint=saver,
            resume=None,
            **inputs,
        )


def _load_inputs(
    storage: Storage, claim: jobstore.Claim, settings: Settings
) -> tuple[Image.Image, list[Image.Image], EngineInputs]:
    """The content, the styles and the masks, decoded under the service's limits (as the API
    inspected them); ``masks`` (one per style; the engine reads their luminance) only when the job
    has masks (so an engine without the keyword still runs every other job)."""
    content = load_input_image(_input_bytes(storage, claim.content_image_id), settings)
    styles = [load_input_image(_input_bytes(storage, i), settings) for i in claim.style_image_ids]
    if not styles:
        raise Failure("invalid_params", "the job has no style image")
    masks = claim.mask_image_ids
    if not masks:
        return content, styles, {}
    return content, styles, {"masks": [load_input_image(_input_bytes(storage, m), settings) for m in masks]}


def _input_bytes(storage: Storage, image_id: str) -> bytes:
    try:
        return storage.get_bytes(storage_keys.image_key(image_id))
    except ObjectNotFound as exc:
        raise Failure("input_missing", f"input image {image_id} is not in storage") from exc


def _resume_point(storage: Storage, claim: jobstore.Claim) -> tuple[Checkpoint | None, int]:
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
    """``on_checkpoint``: upload ``<step>.pt`` and a ``<step>.png`` preview, record the reference, then
    delete the objects of refs beyond the latest ``keep`` (``settings.checkpoints_keep``)."""

    def __init__(
        self, storage: Storage, url: str, claim: jobstore.Claim, watcher: Watcher, keep: int
    ) -> None:
        self.storage, self.url, self.claim, self.watcher = storage, url, claim, watcher
        self.keep = keep
        self.last_step: int | None = None  # the latest checkpoint this attempt recorded

    def __call__(self, ckpt: Checkpoint) -> None:
        from worker.engine.images import tensor_to_pil

        job_id, attempt = self.claim.job_id, self.claim.attempt
        step = int(ckpt.step)
        key, preview_at = storage_keys.checkpoint_key(job_id, step), storage_keys.preview_key(job_id, step)
        self.storage.put_bytes(key, ckpt.to_bytes(), storage_keys.CHECKPOINT_MEDIA_TYPE)
        preview = io.BytesIO()
        tensor_to_pil(ckpt.image).save(preview, format="PNG")
        self.storage.put_bytes(preview_at, preview.getvalue(), storage_keys.PREVIEW_MEDIA_TYPE)
        ref = {
            "key": key,
            "preview_key": preview_at,
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
        self.watcher.raise_if_stopped()

    def _delete(self, keys: list[str]) -> int:
        """Best effort: a delete that fails is logged (the object is left behind), never raised."""
        deleted = 0
        for key in keys:
            try:
                self.storage.delete(key)
                deleted += 1
            except Exception as exc:  # noqa: BLE001 - pruning is best effort; the next prune retries
                log_event(
                    self.claim.job_id,
                    self.claim.attempt,
                    "checkpoint_delete_failed",
                    logging.WARNING,
                    key=key,
                    error=type(exc).__name__,
                    detail=repr(str(exc)[:200]),
                )
        return deleted


def _stopped(
    settings: Settings, claim: jobstore.Claim, reason: StopReason, checkpoint_step: int | None = None
) -> str:
    url, job_id, attempt = settings.database_url, claim.job_id, claim.attempt
    if reason is StopReason.CANCELED:
        jobstore.cancel(url, job_id, attempt)  # no row changed: the API marked it canceled already
        log_event(job_id, attempt, "canceled")
        return "canceled"
    if reason is StopReason.SHUTDOWN:
        if jobstore.release(url, job_id, attempt, graceful=True):
            publish_job(get_celery(), job_id)
        log_event(job_id, attempt, "handed_back", checkpoint_step=checkpoint_step)
        return "handed_back"
    log_event(job_id, attempt, "fenced", stage="run")
    return "fenced"


def _fail(settings: Settings, claim: jobstore.Claim, code: str, message: str, retryable: bool) -> str:
    wrote = jobstore.fail(settings.database_url, claim.job_id, claim.attempt, code, message, retryable)
    log_event(
        claim.job_id,
        claim.attempt,
        "failed" if wrote else "fenced",
        logging.WARNING,
        code=code,
        message=repr(message[:200]),
    )
    return "failed" if wrote else "fenced"


def _engine_failed(settings: Settings, claim: jobstore.Claim, exc: EngineError) -> str:
    """The job's own problem (bad input, config, divergence): the engine's message, written for
    users, non-retryable. The worker's set-up (weights, device): a generic message, the engine's
    (server paths, remedies for the operator) logged; retryable once the operator fixed it."""
    if exc.code not in WORKER_SETUP_CODES:
        return _fail(settings, claim, exc.code, exc.message or exc.code, False)
    log_event(
        claim.job_id,
        claim.attempt,
        "worker_setup_error",
        logging.ERROR,
        code=exc.code,
        detail=repr(exc.message[:500]),
    )
    return _fail(settings, claim, exc.code, WORKER_SETUP_ERROR, True)


WORKER_SETUP_CODES = frozenset({"weights_unavailable", "weights_invalid", "device_unavailable"})
WORKER_SETUP_ERROR = (
    "the worker is not set up to run jobs (model weights or device); the error was "
    "logged with this job's id. Submit the job again later"
)
INTERNAL_ERROR = (
    "the worker failed unexpectedly; the error was logged with this job's id "
    "(quote it when reporting the problem)"
)


def _classify_crash(exc: Exception) -> tuple[str, str, bool]:
    """(code, tenant-visible message, retryable) for an exception nothing else handled."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return (
            "time_limit",
            "the job ran past the worker's time limit; ask for a smaller size or fewer iterations",
            False,
        )
    if isinstance(exc, torch.OutOfMemoryError):
        return (
            "out_of_memory",
            "the worker ran out of memory on this job; ask for a smaller size or fewer style images",
            False,
        )
    return "internal_error", INTERNAL_ERROR, True


def _best_effort(job_id: str, attempt: int, action: Callable[..., object]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the database may be the thing that is down
        log_event(
            job_id,
            attempt,
            "cleanup_failed",
            logging.WARNING,
            error=type(exc).__name__,
            detail=repr(str(exc)[:200]),
        )
