"""A GPU worker's group: the delivered job and waiting jobs of its bucket, run as one batch.

The database is the queue (``shared.dispatch``), so a group is filled from the table, not from the
broker: a worker process that claimed a delivered job whose bucket (``shared.buckets``) others share
takes up to ``batch_limit - 1`` of them that are still waiting, in fair order within the bucket
(``dispatch.fair_picks(bucket=...)``), and claims each with the usual fenced claim. If it found
some but not enough, it looks again for at most ``batch_wait_ms``; if it found none it does not wait
at all, so a lone job starts at once. The dispatcher counts the process as one slot whatever the
group's size (``dispatch.slots_taken``).

Each member keeps every guarantee of a job run alone: its own watcher (heartbeat, cancel, fencing,
shutdown), its own checkpoint uploads (single-job format: it resumes alone), its own NaN guard and
outcome (``worker.engine.groups``), its own settlement (``worker.settle``). If the process dies, the
delivered job is redelivered and the others' leases expire: each runs again and resumes from its own
checkpoint. A job that has a checkpoint runs alone (resuming into a group is not supported); a
failure of the group as a whole (the engine refusing it) gives the members taken from the table
back to the queue and runs the delivered job alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared import dispatch, jobstore_queue
from shared.db import get_sessionmaker
from shared.models import new_id, utcnow
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import Storage, open_storage
from worker import jobstore
from worker.checkpoints import CheckpointSaver
from worker.config import job_params, load_inputs, transfer_config
from worker.engine.schedule import long_edges
from worker.runtime import get_engine
from worker.settle import TRANSIENT, deliver, execution, guarded, log_event, stopped
from worker.watcher import JobStopped, Watcher

if TYPE_CHECKING:
    from worker.engine import TransferConfig
    from worker.engine.groups import GroupJob, GroupOutcome

logger = logging.getLogger(__name__)

BATCH_POLL_S = 0.05  # between looks for more members, within batch_wait_ms
AUTO_BATCH_CUDA = 16


def batch_limit(settings: Settings) -> int:
    """``STYLEQUEUE_BATCH_MAX``, or auto: 16 on CUDA, 1 on CPU (a CPU is saturated by one job)."""
    if settings.batch_max is not None:
        return max(1, settings.batch_max)
    if settings.device == "auto":
        import torch

        return AUTO_BATCH_CUDA if torch.cuda.is_available() else 1
    return AUTO_BATCH_CUDA if settings.device.startswith("cuda") else 1


@dataclass
class Member:
    claim: jobstore.Claim
    params: JobParams
    config: TransferConfig  # the job's own, as a run of it alone has it
    job: GroupJob
    watcher: Watcher
    saver: CheckpointSaver


def run_grouped(first: jobstore.Claim, nodename: str, settings: Settings) -> str | None:
    """The delivered job's outcome when it ran in a group; None: no group (run it alone)."""
    limit = batch_limit(settings)
    if limit <= 1 or first.bucket is None or first.checkpoints:
        return None
    engine = get_engine(settings)
    if not hasattr(engine, "run_group"):  # an engine that runs one job at a time
        return None
    mates = gather(settings, first.bucket, jobstore.worker_identity(nodename), limit - 1)
    if not mates:
        return None
    group = new_id()[:8]
    for claim in (first, *mates):
        log_event(claim.job_id, claim.attempt, "grouped", group=group, jobs=1 + len(mates))
    try:
        outcomes = _run(settings, [first, *mates], group, engine)
    except BaseException:  # the first's transient error (retried by its task), a time limit, ...
        for mate in mates:
            _give_back(settings, mate)
        raise
    if outcomes is None:  # the group as a whole failed: the mates wait again, the first runs alone
        for mate in mates:
            _give_back(settings, mate)
        return None
    return outcomes[first.job_id]


def gather(settings: Settings, bucket: str, me: str, want: int) -> list[jobstore.Claim]:
    """Up to ``want`` waiting jobs of ``bucket``, taken from the table and claimed by ``me``."""
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    mates: list[jobstore.Claim] = []
    while len(mates) < want:
        for job_id in _take_waiting(settings, bucket, want - len(mates)):
            got = jobstore.claim(settings.database_url, job_id, me, settings.lease_s)
            if not isinstance(got, jobstore.Claim):
                log_event(job_id, None, "dropped", reason=got.value)
            elif got.checkpoints:  # it resumes alone, from its checkpoint
                _give_back(settings, got)
            else:
                mates.append(got)
        if not mates or len(mates) >= want or time.monotonic() >= deadline:
            break
        time.sleep(BATCH_POLL_S)  # bounded by batch_wait_ms: more of a burst may be committing
    return mates


def _take_waiting(settings: Settings, bucket: str, count: int) -> list[str]:
    """Take waiting jobs of the bucket from the dispatcher (the guarded claim of a dispatch pass)."""
    now = utcnow()
    with get_sessionmaker(settings.database_url)() as session:
        picks = dispatch.fair_picks(session, count, settings, now, bucket=bucket)
        taken = jobstore_queue.claim_dispatch(session, picks, now)
        session.commit()
    return taken


def _give_back(settings: Settings, claim: jobstore.Claim) -> None:
    """Back to waiting, no attempt used (a no-op for a job that was settled meanwhile)."""
    jobstore.release(settings.database_url, claim.job_id, claim.attempt, graceful=True, waiting=True)
    log_event(claim.job_id, claim.attempt, "ungrouped")


def _run(settings: Settings, claims: list[jobstore.Claim], group: str, engine: Any) -> dict[str, str] | None:
    """Run the group; each member's outcome by job id (None: the group as a whole failed)."""
    storage = open_storage(settings)
    outcomes: dict[str, str] = {}
    with ExitStack() as stack:
        members = _members(settings, storage, claims, stack, outcomes)
        if not members:
            return outcomes
        shared = _shared_config(members[0].config)
        for m in members[1:]:
            if _shared_config(m.config) != shared:  # the bucket said yes, the configs say no
                members.remove(m)
                _give_back(settings, m.claim)
                outcomes[m.claim.job_id] = "handed_back"
        try:
            results = engine.run_group([m.job for m in members], shared)
        except Exception as exc:  # noqa: BLE001 - the group failed as a whole: each job runs alone
            first = claims[0]
            log_event(
                first.job_id,
                first.attempt,
                "group_failed",
                logging.WARNING,
                group=group,
                error=repr(exc)[:200],
            )
            return None
    # The members' uploads are settled (a shutdown's checkpoint recorded before its hand-back). The
    # delivered job last: its transient error is raised on (its task retries it), after the others.
    delivered = claims[0].job_id
    pairs: list[tuple[Member, GroupOutcome]] = list(zip(members, results, strict=True))
    for m, outcome in sorted(pairs, key=lambda pair: pair[0].claim.job_id == delivered):

        def end(m: Member = m, outcome: GroupOutcome = outcome) -> str:
            return _settle(settings, storage, m, outcome, len(members))

        ended = guarded(settings, m.claim, end, retried=m.claim.job_id == delivered)
        outcomes[m.claim.job_id] = ended
        log_event(m.claim.job_id, m.claim.attempt, "group_member_ended", group=group, outcome=ended)
    return outcomes


def _members(
    settings: Settings,
    storage: Storage,
    claims: list[jobstore.Claim],
    stack: ExitStack,
    outcomes: dict[str, str],
) -> list[Member]:
    """Each claim with its params, inputs, watcher and checkpoint saver (entered on ``stack``); a
    job whose params or inputs are bad is settled at once (``outcomes``) and left out."""
    from worker.engine.config import BatchItem
    from worker.engine.groups import GroupJob

    members = []
    for i, claim in enumerate(claims):

        def prepare(claim: jobstore.Claim = claim) -> str:
            params = job_params(claim.params)
            config = transfer_config(params, settings)
            content, styles, inputs = load_inputs(storage, claim, settings)
            edges = params.scales or long_edges(params.size, params.min_size, params.scale_factor)
            watcher = stack.enter_context(Watcher(settings, claim.job_id, claim.attempt, 0, list(edges)))
            saver = stack.enter_context(
                CheckpointSaver(storage, settings.database_url, claim, watcher, settings.checkpoints_keep)
            )
            item = BatchItem(content, styles, masks=inputs.get("masks"), **_item_weights(config))
            job = GroupJob(item, config.seed, watcher.on_progress, saver, config)
            members.append(Member(claim, params, config, job, watcher, saver))
            log_event(claim.job_id, claim.attempt, "started", resume_step=0)
            return "prepared"

        outcome = guarded(settings, claim, prepare, retried=i == 0)
        if outcome != "prepared":
            outcomes[claim.job_id] = outcome
    return members


def _item_weights(config: TransferConfig) -> dict[str, Any]:
    return {
        "style_blend_weights": config.style_blend_weights,
        "content_weight": config.content_weight,
        "style_weight": config.style_weight,
        "tv_weight": config.tv_weight,
    }


def _shared_config(config: TransferConfig) -> TransferConfig:
    """What the members of a group must agree on: the config without its per-item values."""
    return dataclasses.replace(
        config, content_weight=None, style_weight=None, tv_weight=None, style_blend_weights=None, seed=0
    )


def _settle(settings: Settings, storage: Storage, m: Member, outcome: GroupOutcome, size: int) -> str:
    if isinstance(outcome.error, JobStopped):
        return stopped(settings, m.claim, outcome.error.reason, m.saver.last_step)
    if outcome.error is not None:
        raise outcome.error  # guarded() makes it the job's outcome (an engine error, a crash)
    assert outcome.result is not None
    final = m.watcher.progress_now() or {}
    final.update(fraction=1.0, eta_seconds=0.0, step=final.get("total_steps", final.get("step")))
    return deliver(
        settings, storage, m.claim, m.params, outcome.result, final, execution(outcome.result.metadata, size)
    )


__all__ = ["TRANSIENT", "batch_limit", "gather", "run_grouped"]
