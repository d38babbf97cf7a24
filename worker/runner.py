"""Run one job delivery: claim, load inputs, run the engine, store checkpoints and the result.

Outcomes are returned as short strings (for the task's log and tests). Permanent errors (bad image,
bad parameters, missing weights: ``EngineError``) fail the job at once with the engine's code and
message; any other exception fails it with a generic message (its text is only logged); transient ones
(storage or database unreachable, broker connection) give the job back without using up an attempt
and propagate, so the Celery task retries with backoff (at most ``max_retries``). Attempts
(``max_attempts``) count only workers lost mid-job. Every write after the claim is fenced by the
attempt number. Checkpoints are uploaded off the engine's thread, the latest only, and settled
before a hand-back or the result (``worker.checkpoints``); only the latest ``checkpoints_keep`` of a
job are kept: older objects are deleted once a newer reference is recorded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared import dispatch
from shared.db import get_sessionmaker
from shared.queue import get_celery, publish_many
from shared.settings import Settings
from shared.storage import open_storage
from worker import batch, jobstore
from worker.checkpoints import CheckpointSaver, resume_point
from worker.config import EngineInputs, at_run_size, job_params, load_inputs, scale_edges, transfer_config
from worker.engine import EngineError
from worker.runtime import get_engine
from worker.settle import (
    best_effort,
    deliver,
    execution,
    guarded,
    log_event,
    stopped,
)
from worker.watcher import JobStopped, StopReason, Watcher, final_progress

if TYPE_CHECKING:
    from PIL import Image

    from worker.engine import Checkpoint, TransferConfig
    from worker.engine_port import EnginePort, EngineResult

logger = logging.getLogger(__name__)

# Outcomes after which this worker's slot is free: a dispatch pass refills it at once.
FREES_SLOT = frozenset({"succeeded", "failed", "canceled", "fenced"})


def run_job(job_id: str, nodename: str, settings: Settings) -> str:
    """Handle one delivery of ``job_id``; returns the outcome (succeeded, failed, canceled, ...).
    When the job ends, a dispatch pass gives the freed slot its next job (``shared.dispatch``)."""
    outcome = _run_delivery(job_id, nodename, settings)
    if outcome in FREES_SLOT:
        best_effort(job_id, 0, lambda: refill(settings))
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
    grouped = batch.run_grouped(got, nodename, settings)  # a GPU worker: its bucket's waiting jobs
    if grouped is not None:
        return grouped
    return guarded(settings, got, lambda: _execute(got, settings))


def _execute(claim: jobstore.Claim, settings: Settings) -> str:
    storage = open_storage(settings)
    params = job_params(claim.params)
    config = transfer_config(params, settings)
    content, styles, inputs = load_inputs(storage, claim, settings)
    content, inputs, exact_wh = at_run_size(params, content, inputs)
    resume, start_step = resume_point(storage, claim)
    engine = get_engine(settings)
    with Watcher(settings, claim.job_id, claim.attempt, start_step, scale_edges(params)) as watcher:
        keep = settings.checkpoints_keep
        with CheckpointSaver(storage, settings.database_url, claim, watcher, keep) as saver:
            log_event(claim.job_id, claim.attempt, "started", resume_step=start_step)
            result = _run_engine(engine, content, styles, config, watcher, saver, resume, inputs)
        # Leaving the block settled the uploads: a shutdown's checkpoint is recorded before the
        # hand-back releases the job, the last scale's before the result (worker.checkpoints).
        if isinstance(result, StopReason):
            return stopped(settings, claim, result, saver.last_step)
        final = final_progress(watcher.progress_now(), result.metadata)
    return deliver(settings, storage, claim, params, result, final, execution(result.metadata, 1), exact_wh)


def _run_engine(
    engine: EnginePort,
    content: Image.Image,
    styles: list[Image.Image],
    config: TransferConfig,
    watcher: Watcher,
    saver: CheckpointSaver,
    resume: Checkpoint | None,
    inputs: EngineInputs,
) -> EngineResult | StopReason:
    """``engine.run`` (+ ``inputs``), or why the watcher stopped it; a checkpoint it will not resume
    from is skipped (start afresh)."""

    def run(start: Checkpoint | None) -> EngineResult:
        return engine.run(
            content,
            styles,
            config,
            on_progress=watcher.on_progress,
            on_checkpoint=saver,
            resume=start,
            **inputs,
        )

    try:
        try:
            return run(resume)
        except EngineError as exc:
            if resume is None or exc.code not in ("checkpoint_mismatch", "checkpoint_invalid"):
                raise
            log_event(
                saver.claim.job_id, saver.claim.attempt, "resume_skipped", logging.WARNING, error=exc.code
            )
            watcher.start_step = 0
            return run(None)
    except JobStopped as stop:
        return stop.reason
