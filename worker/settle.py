"""How a job's attempt ends, for a job run alone (worker.runner) or in a group (worker.batch): its
result delivered, a stop (cancel, fencing, hand-back), a failure with a code and a message for the
tenant. Every write is fenced by the attempt.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy.exc import OperationalError

from shared import logs, storage_keys
from shared.models import utcnow
from shared.params import JobParams, fit_long_edge
from shared.queue import get_celery, publish_job
from shared.settings import Settings
from shared.storage import Storage, StorageUnavailable
from worker import jobstore, metrics
from worker.config import Failure
from worker.crashes import WORKER_SETUP_CODES, WORKER_SETUP_ERROR, classify_crash
from worker.engine import EngineError, save_image
from worker.thumbs import thumbnail
from worker.watcher import StopReason

if TYPE_CHECKING:
    from worker.engine_port import EngineResult

logger = logging.getLogger(__name__)

# Errors worth retrying later: the task declares these in ``autoretry_for``.
TRANSIENT: tuple[type[BaseException], ...] = (StorageUnavailable, OperationalError, ConnectionError)


def log_event(job_id: str, attempt: int | None, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One worker event in the service's log shape (shared.logs)."""
    logs.event(logger, event, job_id=job_id, attempt=attempt, level=level, **fields)


# A group member's outcome (``retried=False``): its transient error counted, but the write giving it
# back failed too; worker.batch gives it back again once the group has run.
UNRELEASED = "unreleased"
GAVE_BACK = "stylequeue_gave_back"  # on a transient error guarded() raised on: the job it gave back


def gave_back(exc: BaseException, claim: jobstore.Claim) -> bool:
    """Whether ``exc`` was raised on by ``guarded`` for ``claim`` (its outcome counted already)."""
    return getattr(exc, GAVE_BACK, None) == claim.job_id


def release_transient(settings: Settings, claim: jobstore.Claim, *, retried: bool) -> bool:
    """Give the job back after a transient error, no attempt used (best effort: the database may be
    what is down; False when the write failed); ``retried``: due by the task's latest retry, else
    waiting for the dispatcher."""
    due = utcnow() + timedelta(seconds=settings.retry_backoff_max_s) if retried else None
    url, job_id, attempt = settings.database_url, claim.job_id, claim.attempt
    return best_effort(
        job_id,
        attempt,
        lambda: jobstore.release(url, job_id, attempt, graceful=True, message_due=due, waiting=not retried),
    )


def guarded(
    settings: Settings, claim: jobstore.Claim, action: Callable[[], str], *, retried: bool = True
) -> str:
    """``action()`` (the attempt's run), its exceptions made outcomes: a job's own problem fails it
    with a code, a crash with a generic message (the exception is logged in full), and a transient
    error (storage or database unreachable) gives the job back without using up an attempt.
    ``retried``: the delivery's task retries it (the error is raised on; the job is due by the
    retry's latest ETA); False (a job a group took from the table, with no message): it waits again."""
    try:
        return action()
    except TRANSIENT as exc:
        log_event(
            claim.job_id,
            claim.attempt,
            "transient_error",
            logging.WARNING,
            error=type(exc).__name__,
            detail=str(exc)[:200],
        )
        # Not counted as an attempt (graceful): the task's max_retries bounds transient retries and
        # ends them with ``unavailable``. Counting them made a storage blip of under a second use up
        # all three attempts and fail the job as ``worker_lost`` (tests/faults, storage outage).
        released = release_transient(settings, claim, retried=retried)
        metrics.attempt_ended(claim.job_id, "transient")
        if retried:
            with contextlib.suppress(AttributeError):  # an exception class without attributes
                setattr(exc, GAVE_BACK, claim.job_id)
            raise
        return "handed_back" if released else UNRELEASED
    except Failure as exc:
        return fail(settings, claim, exc.code, exc.message, exc.retryable)
    except EngineError as exc:
        return engine_failed(settings, claim, exc)
    except Exception as exc:  # noqa: BLE001 - any crash fails the job with a code; logged in full
        # Never the exception's text (torch internals, paths, SQL): a generic message with a code,
        # and the whole exception in the log under the job's id.
        code, message, retryable = classify_crash(exc)
        logs.event(
            logger,
            "crash",
            job_id=claim.job_id,
            attempt=claim.attempt,
            level=logging.ERROR,
            exc_info=True,
            code=code,
            error=type(exc).__name__,
        )
        return fail(settings, claim, code, message, retryable)


def execution(meta: Mapping[str, Any], group_size: int) -> dict[str, Any]:
    """``jobs.execution`` from a result's metadata (worker.engine ``Result.metadata``)."""
    return {
        "device": meta.get("device"),
        "precision": meta.get("precision"),
        "weights": meta.get("weights_source"),
        "random_weights": meta.get("random_weights"),
        "group_size": group_size,
        "engine_seconds": meta.get("seconds"),
    }


def deliver(
    settings: Settings,
    storage: Storage,
    claim: jobstore.Claim,
    params: JobParams,
    result: EngineResult,
    final: dict[str, Any],
    ran: dict[str, Any],
    exact_wh: tuple[int, int] | None = None,
) -> str:
    """Store the result and its thumbnail (one pair per attempt) and record them, unless a newer
    attempt holds the job. ``exact_wh``: the content's own size, when the job ran at a snapped aspect
    ratio: the result is resized back to that aspect (``worker.config.at_run_size``). The thumbnail's
    key is recorded in ``jobs.execution`` (``storage_keys.RESULT_THUMB_FIELD``): a job of an earlier
    version has none, and the page then shows its full result."""
    # One key per attempt: an attempt that lost the job (a newer one took over) can never overwrite
    # the result the newer attempt recorded; it deletes its own objects instead (below).
    key = storage_keys.result_key(claim.job_id, claim.attempt, params.output_format)
    thumb = storage_keys.result_thumb_key(claim.job_id, claim.attempt)
    # A newer attempt may hold the job by now (this one was presumed dead): never overwrite the
    # result it wrote or will write. (A fenced heartbeat: no row changed means not ours any more.)
    if not jobstore.heartbeat(settings.database_url, claim.job_id, claim.attempt):
        log_event(claim.job_id, claim.attempt, "fenced", stage="before_result")
        return ended(settings, claim, "fenced")
    store_result(storage, key, thumb, params, result.image, exact_wh)
    ran = {**ran, storage_keys.RESULT_THUMB_FIELD: thumb}
    if not jobstore.succeed(settings.database_url, claim.job_id, claim.attempt, key, final, ran):
        delete_quietly(storage, claim, [key, thumb])
        log_event(claim.job_id, claim.attempt, "fenced", stage="result")
        return ended(settings, claim, "fenced")
    earlier = range(1, claim.attempt)  # objects of attempts that died after uploading
    delete_quietly(
        storage,
        claim,
        [storage_keys.result_key(claim.job_id, a, params.output_format) for a in earlier]
        + [storage_keys.result_thumb_key(claim.job_id, a) for a in earlier],
    )
    log_event(claim.job_id, claim.attempt, "succeeded", result_key=key)
    metrics.delivered(result.metadata)
    return ended(settings, claim, "succeeded")


def store_result(
    storage: Storage,
    key: str,
    thumb: str,
    params: JobParams,
    image: Image.Image,
    exact_wh: tuple[int, int] | None,
) -> None:
    """Put the result (in ``params.output_format``, back at ``exact_wh``'s aspect if given) under
    ``key`` and its small JPEG thumbnail (``worker.thumbs``) under ``thumb``."""
    if exact_wh is not None:
        image = image.resize(fit_long_edge(exact_wh, max(image.size)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    save_image(image, buf, format=params.output_format, quality=params.quality)
    storage.put_bytes(key, buf.getvalue(), storage_keys.result_media_type(params.output_format))
    storage.put_bytes(thumb, thumbnail(image), storage_keys.THUMB_MEDIA_TYPE)


def delete_quietly(storage: Storage, claim: jobstore.Claim, keys: list[str]) -> None:
    """Delete these objects, each best effort (a failure is logged; the orphan sweep gets it)."""
    for stale in keys:
        best_effort(claim.job_id, claim.attempt, lambda k=stale: storage.delete(k))


def stopped(
    settings: Settings,
    claim: jobstore.Claim,
    reason: StopReason,
    checkpoint_step: int | None = None,
    *,
    delivered: bool = True,
) -> str:
    """The outcome of a run its watcher stopped. A shutdown hands the job back: the delivered job
    with a new message (its own is acked); a group's other member (``delivered=False``) back to
    waiting, so that the redelivered job takes it into its group again (worker.batch)."""
    url, job_id, attempt = settings.database_url, claim.job_id, claim.attempt
    if reason is StopReason.CANCELED:
        jobstore.cancel(url, job_id, attempt)  # no row changed: the API marked it canceled already
        log_event(job_id, attempt, "canceled")
        return ended(settings, claim, "canceled")
    if reason is StopReason.SHUTDOWN:
        return hand_back(settings, claim, delivered=delivered, checkpoint_step=checkpoint_step)
    log_event(job_id, attempt, "fenced", stage="run")
    return ended(settings, claim, "fenced")


def hand_back(
    settings: Settings, claim: jobstore.Claim, *, delivered: bool, alone: bool = False, **fields: Any
) -> str:
    """Back to the queue, no attempt used: the delivered job with a new message (its own is acked),
    a group's other member to waiting (the dispatcher's); ``alone``: it runs alone from now on (its
    bucket cleared; worker.batch). ``fields``: for the log line."""
    url, job_id, attempt = settings.database_url, claim.job_id, claim.attempt
    released = jobstore.release(url, job_id, attempt, graceful=True, waiting=not delivered, alone=alone)
    if not released:  # canceled, or a newer attempt holds it: nothing of it is this attempt's now
        log_event(job_id, attempt, "fenced", stage="hand_back")
        return ended(settings, claim, "fenced")
    if delivered:
        publish_job(get_celery(), job_id)
    log_event(job_id, attempt, "handed_back", **({"alone": True} if alone else {}), **fields)
    return ended(settings, claim, "handed_back")


def fail(settings: Settings, claim: jobstore.Claim, code: str, message: str, retryable: bool) -> str:
    wrote = jobstore.fail(settings.database_url, claim.job_id, claim.attempt, code, message, retryable)
    log_event(
        claim.job_id,
        claim.attempt,
        "failed" if wrote else "fenced",
        logging.WARNING,
        code=code,
        message=repr(message[:200]),
    )
    return ended(settings, claim, "failed", code) if wrote else ended(settings, claim, "fenced")


def ended(settings: Settings, claim: jobstore.Claim, outcome: str, code: str | None = None) -> str:
    """``outcome``, counted (``worker.metrics``): the attempt's, and a job's end (its queue wait)."""
    metrics.attempt_ended(claim.job_id, outcome, code)
    metrics.job_ended(settings.database_url, claim.job_id, outcome)
    return outcome


def engine_failed(settings: Settings, claim: jobstore.Claim, exc: EngineError) -> str:
    """The job's own problem (bad input, config, divergence): the engine's message, written for
    users, non-retryable. The worker's set-up (weights, device): a generic message, the engine's
    (server paths, remedies for the operator) logged; retryable once the operator fixed it."""
    if exc.code not in WORKER_SETUP_CODES:
        return fail(settings, claim, exc.code, exc.message or exc.code, False)
    log_event(
        claim.job_id,
        claim.attempt,
        "worker_setup_error",
        logging.ERROR,
        code=exc.code,
        detail=repr(exc.message[:500]),
    )
    return fail(settings, claim, exc.code, WORKER_SETUP_ERROR, True)


def best_effort(job_id: str, attempt: int, action: Callable[..., object]) -> bool:
    """``action()``, its failure logged (False); the delivery's time limit is raised on, never
    swallowed."""
    try:
        action()
        return True
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # noqa: BLE001 - the database may be the thing that is down
        log_event(
            job_id,
            attempt,
            "cleanup_failed",
            logging.WARNING,
            error=type(exc).__name__,
            detail=repr(str(exc)[:200]),
        )
        return False
