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
checkpoint. A job that has a checkpoint runs alone (resuming into a group is not supported). If
the group fails as a whole (the engine refuses it, or runs out of memory), each member runs alone,
here and now, rather than going back to be grouped, and to fail, again. A time limit ends every
member (``time_limit``); a database outage while the group is filled gives every job back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

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
from worker.settle import TRANSIENT, best_effort, deliver, execution, guarded, log_event, stopped
from worker.startup_check import device_of
from worker.watcher import JobStopped, Watcher

if TYPE_CHECKING:
    from worker.engine import TransferConfig
    from worker.engine.groups import GroupJob, GroupOutcome

logger = logging.getLogger(__name__)

BATCH_POLL_S = 0.05  # between looks for more members, within batch_wait_ms
AUTO_BATCH_CUDA = 16


def batch_limit(settings: Settings, device_kind: str | None = None) -> int:
    """``STYLEQUEUE_BATCH_MAX``, or auto: 16 on CUDA, 1 on CPU (a CPU is saturated by one job).
    The device is found without initialising CUDA (the Celery main process must not)."""
    if settings.batch_max is not None:
        return max(1, settings.batch_max)
    kind = device_kind or device_of(settings.device)[1]
    return AUTO_BATCH_CUDA if kind == "cuda" else 1


@dataclass
class Member:
    claim: jobstore.Claim
    params: JobParams
    config: TransferConfig  # the job's own, as a run of it alone has it
    shared: TransferConfig  # without its per-item values: what the group's members agree on
    job: GroupJob
    watcher: Watcher
    saver: CheckpointSaver


Alone = Callable[[jobstore.Claim], str]  # runs one claimed job by itself (worker.runner)


def run_grouped(first: jobstore.Claim, nodename: str, settings: Settings, alone: Alone) -> str | None:
    """The delivered job's outcome when it ran in a group; None: no group (run it alone)."""
    limit = batch_limit(settings)
    if limit <= 1 or first.bucket is None or first.checkpoints:
        return None
    engine = get_engine(settings)
    if not hasattr(engine, "run_group"):  # an engine that runs one job at a time
        return None
    mates: list[jobstore.Claim] = []
    try:
        gather(settings, first.bucket, jobstore.worker_identity(nodename), limit - 1, mates)
    except TRANSIENT as exc:  # the database went away while the group was filled
        for mate in mates:
            best_effort(mate.job_id, mate.attempt, lambda m=mate: _give_back(settings, m))
        return guarded(settings, first, _raiser(exc))  # given back; its task retries
    if not mates:
        return None
    group = new_id()[:8]
    for claim in (first, *mates):
        log_event(claim.job_id, claim.attempt, "grouped", group=group, jobs=1 + len(mates))
    try:
        outcomes = _run(settings, [first, *mates], group, engine)
    except BaseException:  # the first's transient error (its task retries it) after the others settled
        for mate in mates:
            best_effort(mate.job_id, mate.attempt, lambda m=mate: _give_back(settings, m))
        raise
    if outcomes is None:
        # The group as a whole failed (the engine refused it, out of memory, ...): each job runs
        # alone here, now, rather than going back to be grouped (and to fail) again.
        for mate in mates:

            def run_alone(mate: jobstore.Claim = mate) -> str:
                return alone(mate)

            ended = guarded(settings, mate, run_alone, retried=False)
            log_event(mate.job_id, mate.attempt, "group_member_ended", group=group, outcome=ended)
        return None
    return outcomes[first.job_id]


def _raiser(exc: BaseException) -> Callable[[], str]:
    def again() -> str:
        raise exc

    return again


def gather(settings: Settings, bucket: str, me: str, want: int, mates: list[jobstore.Claim]) -> None:
    """Add to ``mates`` up to ``want`` waiting jobs of ``bucket``, taken from the table and claimed by
    ``me`` (a list the caller holds, so that it can give them back if this raises)."""
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(mates) < want:
        for job_id in _take_waiting(settings, bucket, want - len(mates)):
            got = jobstore.claim(settings.database_url, job_id, me, settings.lease_s)
            if not isinstance(got, jobstore.Claim):
                log_event(job_id, None, "dropped", reason=got.value)
            else:
                mates.append(got)
        if not mates or len(mates) >= want or time.monotonic() >= deadline:
            break
        time.sleep(BATCH_POLL_S)  # bounded by batch_wait_ms: more of a burst may be committing


def _take_waiting(settings: Settings, bucket: str, count: int) -> list[str]:
    """Take waiting jobs of the bucket from the dispatcher (the guarded claim of a dispatch pass);
    never one with a checkpoint (it resumes alone: ``dispatch.fair_picks`` leaves those out)."""
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
    """Run the group; each member's outcome by job id (None: the group as a whole failed).

    Every member's watcher (heartbeat, cancel, fencing) runs from before its inputs are read until
    it is settled; the checkpoint uploads of all are settled first (a shutdown's checkpoint is
    recorded before its hand-back)."""
    storage = open_storage(settings)
    outcomes: dict[str, str] = {}
    with ExitStack() as watching:
        watchers = _watch(settings, claims, watching, outcomes)
        with ExitStack() as saving:
            members = _members(settings, storage, watchers, saving, outcomes)
            if not members:
                return outcomes
            results = _run_engine(engine, members, group)
        if results is None:
            return None
        _settle_all(settings, storage, members, results, claims[0].job_id, group, outcomes)
    return outcomes


def _run_engine(engine: Any, members: list[Member], group: str) -> list[GroupOutcome] | None:
    """``engine.run_group``; None when the group as a whole failed; a time limit ends every member."""
    from worker.engine.groups import GroupOutcome

    try:
        results: list[GroupOutcome] = engine.run_group([m.job for m in members], members[0].shared)
        return results
    except SoftTimeLimitExceeded as exc:  # the delivery's limit: every member ran past it
        return [GroupOutcome(error=exc) for _ in members]
    except Exception as exc:  # noqa: BLE001 - the group failed as a whole: each job runs alone
        first = members[0].claim
        error = repr(exc)[:200]
        log_event(first.job_id, first.attempt, "group_failed", logging.WARNING, group=group, error=error)
        return None


def _settle_all(
    settings: Settings,
    storage: Storage,
    members: list[Member],
    results: list[GroupOutcome],
    delivered: str,
    group: str,
    outcomes: dict[str, str],
) -> None:
    """Each member's outcome, the delivered job last: its transient error is raised on (its task
    retries it), after the others are settled."""
    pairs = sorted(zip(members, results, strict=True), key=lambda pair: pair[0].claim.job_id == delivered)
    for m, outcome in pairs:

        def end(m: Member = m, outcome: GroupOutcome = outcome) -> str:
            return _settle(settings, storage, m, outcome, len(members))

        ended = guarded(settings, m.claim, end, retried=m.claim.job_id == delivered)
        outcomes[m.claim.job_id] = ended
        m.watcher.close()  # settled: its heartbeat may stop
        log_event(m.claim.job_id, m.claim.attempt, "group_member_ended", group=group, outcome=ended)


def _watch(
    settings: Settings, claims: list[jobstore.Claim], stack: ExitStack, outcomes: dict[str, str]
) -> list[tuple[jobstore.Claim, JobParams, Watcher]]:
    """Each claim's params and a running watcher (a job whose params are bad is failed at once)."""
    watched = []
    for i, claim in enumerate(claims):
        found: list[tuple[jobstore.Claim, JobParams, Watcher]] = []

        def watch(claim: jobstore.Claim = claim, found: list[Any] = found) -> str:
            params = job_params(claim.params)
            edges = params.scales or long_edges(params.size, params.min_size, params.scale_factor)
            watcher = stack.enter_context(Watcher(settings, claim.job_id, claim.attempt, 0, list(edges)))
            found.append((claim, params, watcher))
            return "watched"

        outcome = guarded(settings, claim, watch, retried=i == 0)
        if found:
            watched.extend(found)
        else:
            outcomes[claim.job_id] = outcome
    return watched


def _members(
    settings: Settings,
    storage: Storage,
    watched: list[tuple[jobstore.Claim, JobParams, Watcher]],
    stack: ExitStack,
    outcomes: dict[str, str],
) -> list[Member]:
    """Each watched job with its inputs and checkpoint saver (entered on ``stack``); a job whose
    inputs are bad, or whose config differs from the first's, is settled at once and left out."""
    from worker.engine.config import BatchItem
    from worker.engine.groups import GroupJob

    members: list[Member] = []
    for i, (claim, params, watcher) in enumerate(watched):

        def prepare(
            claim: jobstore.Claim = claim, params: JobParams = params, watcher: Watcher = watcher
        ) -> str:
            config = transfer_config(params, settings)
            shared = _shared_config(config)
            if members and shared != members[0].shared:  # the bucket said yes, the configs say no
                _give_back(settings, claim)
                return "handed_back"
            content, styles, inputs = load_inputs(storage, claim, settings)
            saver = stack.enter_context(
                CheckpointSaver(storage, settings.database_url, claim, watcher, settings.checkpoints_keep)
            )
            item = BatchItem(content, styles, masks=inputs.get("masks"), **_item_weights(config))
            job = GroupJob(item, config.seed, watcher.on_progress, saver, config)
            members.append(Member(claim, params, config, shared, job, watcher, saver))
            log_event(claim.job_id, claim.attempt, "started", resume_step=0)
            return "prepared"

        outcome = guarded(settings, claim, prepare, retried=i == 0 and claim is watched[0][0])
        if outcome != "prepared":
            outcomes[claim.job_id] = outcome
            watcher.close()
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
