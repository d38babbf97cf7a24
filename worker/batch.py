"""A GPU worker's group: the delivered job and waiting jobs of its bucket, run as one batch.

The database is the queue (``shared.dispatch``), so a group is filled from the table, not from the
broker: a worker process that claimed a delivered job whose bucket (``shared.buckets``) others share
takes up to ``batch_limit - 1`` of them that are still waiting and start at the scale it does (fresh
jobs at 0, a job with a checkpoint where that checkpoint left it: ``jobs.resume_scale``), in fair
order within the bucket (``dispatch.fair_picks(among=...)``), and claims each with the usual fenced
claim. If it found
some but not enough, it looks again for at most ``batch_wait_ms``; if it found none it does not wait
at all, so a lone job starts at once. The dispatcher counts the process as one slot whatever the
group's size (``dispatch.slots_taken``).

Each member keeps every guarantee of a job run alone: its own watcher (heartbeat, cancel, fencing,
shutdown), its own checkpoint uploads (single-job format), its own NaN guard and outcome
(``worker.engine.groups``), its own settlement (``worker.settle``). If the process dies, the
delivered job is redelivered and the others' leases expire: each runs again and resumes from its own
checkpoint, alone or in a group again (a redelivered group regroups: its members checkpointed at the
same scale). A member that cannot go on in the group (its checkpoint turned out unreadable, or the
engine refuses it) runs alone after the group, here and now, from its checkpoints as recorded then;
so does each member when the group fails as a whole (the engine refuses it, or runs out of memory),
rather than going back to be grouped, and to fail, again. Its watcher keeps its lease until its run
alone starts, so that no reconciler takes it over while the others run. A time limit ends every
member (``time_limit``); a database outage while the group is filled gives every job back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from shared import dispatch, jobstore_queue
from shared.db import get_sessionmaker
from shared.dispatch import Among
from shared.jobs import JobStatus
from shared.jobstore import resume_scale
from shared.models import new_id, utcnow
from shared.settings import Settings
from shared.storage import open_storage
from worker import jobstore, metrics
from worker.batch_members import Member, give_back, prepare_members, settle_all, watch_all
from worker.runtime import get_engine
from worker.settle import TRANSIENT, best_effort, ended, guarded, log_event
from worker.startup_check import device_of

if TYPE_CHECKING:
    from worker.engine.groups import GroupOutcome

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


Alone = Callable[[jobstore.Claim, bool], str]  # runs a claimed job by itself (worker.runner); bool:
# the job is the delivered one (its message), not a group's other member (worker.settle.stopped)


def run_grouped(first: jobstore.Claim, nodename: str, settings: Settings, alone: Alone) -> str | None:
    """The delivered job's outcome when a group was formed (it ran in it, or alone after it);
    None: no group (run it alone)."""
    limit = batch_limit(settings)
    if limit <= 1 or first.bucket is None:
        return None
    among = Among(first.bucket, resume_scale(first.checkpoints))
    engine = get_engine(settings)
    if not hasattr(engine, "run_group"):  # an engine that runs one job at a time
        return None
    mates: list[jobstore.Claim] = []
    try:
        gather(settings, among, jobstore.worker_identity(nodename), limit - 1, mates)
    except TRANSIENT as exc:  # the database went away while the group was filled
        for mate in mates:
            best_effort(mate.job_id, mate.attempt, lambda m=mate: give_back(settings, m))
        return guarded(settings, first, _raiser(exc))  # given back; its task retries
    metrics.group_formed(1 + len(mates))
    if not mates:
        return None
    group = new_id()[:8]
    for claim in (first, *mates):
        log_event(claim.job_id, claim.attempt, "grouped", group=group, jobs=1 + len(mates))
    try:
        return _run(settings, [first, *mates], group, engine, among.resume_scale, alone)
    except BaseException:  # the first's transient error (its task retries it): the rest go back
        for mate in mates:  # (a no-op for those settled)
            best_effort(mate.job_id, mate.attempt, lambda m=mate: give_back(settings, m))
        raise


def _raiser(exc: BaseException) -> Callable[[], str]:
    def again() -> str:
        raise exc

    return again


def gather(settings: Settings, among: Among, me: str, want: int, mates: list[jobstore.Claim]) -> None:
    """Add to ``mates`` up to ``want`` waiting jobs ``among`` a bucket and resume scale, taken from the
    table and claimed by ``me`` (a list the caller holds, so that it can give them back if this raises)."""
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(mates) < want:
        for job_id in _take_waiting(settings, among, want - len(mates)):
            got = jobstore.claim(settings.database_url, job_id, me, settings.lease_s)
            if not isinstance(got, jobstore.Claim):
                log_event(job_id, None, "dropped", reason=got.value)
            else:
                metrics.attempt_started(got.job_id)
                mates.append(got)
        if not mates or len(mates) >= want or time.monotonic() >= deadline:
            break
        time.sleep(BATCH_POLL_S)  # bounded by batch_wait_ms: more of a burst may be committing


def _take_waiting(settings: Settings, among: Among, count: int) -> list[str]:
    """Take waiting jobs of the bucket that start at the group's scale from the dispatcher (the
    guarded claim of a dispatch pass)."""
    now = utcnow()
    with get_sessionmaker(settings.database_url)() as session:
        picks = dispatch.fair_picks(session, count, settings, now, among=among)
        taken = jobstore_queue.claim_dispatch(session, picks, now)
        session.commit()
    return taken


def _run(
    settings: Settings, claims: list[jobstore.Claim], group: str, engine: Any, scale: int, alone: Alone
) -> str:
    """Run the group from ``scale``, then alone each member it did not settle (the group failed
    as a whole, or the job could not go on in it), the delivered job (``claims[0]``) first, rather
    than send it back to be grouped, and to fail, again: the delivered job's outcome.

    Every member's watcher (heartbeat, cancel, fencing) runs from before its inputs are read until
    it is settled or its run alone starts (its lease is kept while others run); the checkpoint
    uploads of all are settled first (a shutdown's checkpoint is recorded before its hand-back)."""
    storage = open_storage(settings)
    outcomes: dict[str, str] = {}
    with ExitStack() as watching:
        watchers = watch_all(settings, claims, watching, outcomes)
        with ExitStack() as saving:
            delivered = claims[0].job_id
            members = prepare_members(settings, storage, watchers, saving, outcomes, delivered, scale)
            results = _run_engine(engine, members, group) if members else None
        if results is not None:
            settle_all(settings, storage, members, results, delivered, group, outcomes)
        for claim, _, watcher in watchers:
            if claim.job_id not in outcomes:
                watcher.close()  # its run alone has its own
                outcomes[claim.job_id] = _alone(settings, claim, alone, claim.job_id == delivered, group)
    return outcomes[claims[0].job_id]


def _alone(settings: Settings, claim: jobstore.Claim, alone: Alone, delivered: bool, group: str) -> str:
    """The claimed job run alone after its group; from its checkpoints as recorded now (the group
    may have recorded newer ones, and dropped those it was claimed with)."""

    def run() -> str:
        refs = jobstore.held_checkpoints(settings.database_url, claim.job_id, claim.attempt)
        if refs is None:  # no longer its holder: canceled, or its lease was taken over
            snap = jobstore.snapshot(settings.database_url, claim.job_id)
            gone = "canceled" if snap is not None and snap.status is JobStatus.CANCELED else "fenced"
            log_event(claim.job_id, claim.attempt, gone, stage="group")
            return ended(settings, claim, gone)
        return alone(dataclasses.replace(claim, checkpoints=refs), delivered)

    outcome = guarded(settings, claim, run, retried=delivered)
    log_event(claim.job_id, claim.attempt, "group_member_ended", group=group, outcome=outcome)
    return outcome


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


__all__ = ["TRANSIENT", "batch_limit", "gather", "run_grouped"]
