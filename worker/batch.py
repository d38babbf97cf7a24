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
engine refuses it) goes back to the queue once the group has run, to run alone (its bucket cleared,
no attempt used: the delivered job with a new message, the others to waiting); so does each member
when the group fails as a whole (the engine refuses it, or runs out of memory), rather than being
grouped, and failing, again. Each then gets its own delivery and time limit, on any worker, and
resumes from its latest checkpoint; until it is given back its watcher keeps its lease; one
canceled meanwhile ends canceled. A time limit ends every member (``time_limit``), wherever it
lands (in the engine, or in one member's callback: ``GroupAborted``); before the group runs, it
fails the delivered job and gives the others back. A database outage while the group is filled
gives every job back. An error outside every member's guard (the database or a bug while the group
is filled, storage cannot be opened, a saver fails to close) gives the others back and the
delivered job the outcome a run alone would have: no job of the group is left held until its lease
runs out, and none is counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from shared import dispatch, jobstore_queue
from shared.db import get_sessionmaker
from shared.dispatch import Among
from shared.jobstore import resume_scale
from shared.models import new_id, utcnow
from shared.settings import Settings
from shared.storage import open_storage
from worker import jobstore, metrics
from worker.batch_members import Member, give_back, prepare_members, settle_all, watch_all
from worker.engine.errors import GroupAborted
from worker.runtime import get_engine
from worker.settle import (
    TRANSIENT,
    UNRELEASED,
    best_effort,
    gave_back,
    guarded,
    hand_back,
    log_event,
    release_transient,
    stopped,
)
from worker.startup_check import device_of
from worker.watcher import StopReason, Watcher

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


def run_grouped(first: jobstore.Claim, nodename: str, settings: Settings) -> str | None:
    """The delivered job's outcome when it ran in a group; None: no group (run it alone)."""
    limit = batch_limit(settings)
    if limit <= 1 or first.bucket is None:
        return None
    among = Among(first.bucket, resume_scale(first.checkpoints))
    try:
        engine = get_engine(settings)
    except SoftTimeLimitExceeded as exc:  # the delivery's limit (waiting for the preload, say)
        return guarded(settings, first, _raiser(exc))
    except Exception:  # noqa: BLE001 - the run alone builds it again, guarded: the job gets its code
        return None
    if not hasattr(engine, "run_group"):  # an engine that runs one job at a time
        return None
    mates: list[jobstore.Claim] = []
    outcomes: dict[str, str] = {}  # each member's, as it is settled
    try:
        me = jobstore.worker_identity(nodename)
        return _gather_and_run(settings, first, among, me, limit, engine, (mates, outcomes))
    except BaseException as exc:  # the rest go back (a no-op for those settled)
        for mate in mates:
            counted = mate.job_id in outcomes
            best_effort(
                mate.job_id, mate.attempt, lambda m=mate, c=counted: give_back(settings, m, counted=c)
            )
        if isinstance(exc, Exception) and _still_held(settings, first):
            if gave_back(exc, first):  # its guard counted it but could not release it: once more
                release_transient(settings, first, retried=True)
                raise
            # Raised outside every member's guard (the database while the group was filled, storage
            # could not be opened, a saver failed to close): the delivered job gets the outcome a run
            # alone would have (given back for its task's retry, or failed with a code), rather than
            # waiting out its lease. One its guard settled or gave back already is not held.
            return guarded(settings, first, _raiser(exc))
        raise


def _gather_and_run(
    settings: Settings,
    first: jobstore.Claim,
    among: Among,
    me: str,
    limit: int,
    engine: Any,
    members: tuple[list[jobstore.Claim], dict[str, str]],
) -> str | None:
    mates, outcomes = members
    gather(settings, among, me, limit - 1, mates)
    metrics.group_formed(1 + len(mates))
    if not mates:
        return None
    group = new_id()[:8]
    for claim in (first, *mates):
        log_event(claim.job_id, claim.attempt, "grouped", group=group, jobs=1 + len(mates))
    return _run(settings, [first, *mates], group, engine, among.resume_scale, outcomes)


def _still_held(settings: Settings, claim: jobstore.Claim) -> bool:
    """Whether ``claim``'s attempt still holds its job (False when that cannot be told)."""
    try:
        return jobstore.held_checkpoints(settings.database_url, claim.job_id, claim.attempt) is not None
    except TRANSIENT:
        return False


def _raiser(exc: BaseException) -> Callable[[], str]:
    def again() -> str:
        raise exc

    return again


def gather(settings: Settings, among: Among, me: str, want: int, mates: list[jobstore.Claim]) -> None:
    """Add to ``mates`` up to ``want`` waiting jobs ``among`` a bucket and resume scale, taken from the
    table and claimed by ``me`` (a list the caller holds, so that it can give them back if this raises)."""
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while len(mates) < want:
        taken, at = _take_waiting(settings, among, want - len(mates))
        for i, job_id in enumerate(taken):
            try:
                got = jobstore.claim(settings.database_url, job_id, me, settings.lease_s)
            except BaseException:  # those not claimed wait again, rather than for the reconciler
                best_effort(job_id, 0, lambda rest=taken[i:], at=at: _unclaim(settings, rest, at))
                raise
            if not isinstance(got, jobstore.Claim):
                log_event(job_id, None, "dropped", reason=got.value)
            else:
                metrics.attempt_started(got.job_id)
                mates.append(got)
        if not mates or len(mates) >= want or time.monotonic() >= deadline:
            break
        time.sleep(BATCH_POLL_S)  # bounded by batch_wait_ms: more of a burst may be committing


def _take_waiting(settings: Settings, among: Among, count: int) -> tuple[list[str], datetime]:
    """Take waiting jobs of the bucket that start at the group's scale from the dispatcher (the
    guarded claim of a dispatch pass); and when (their ``published_at``)."""
    now = utcnow()
    with get_sessionmaker(settings.database_url)() as session:
        picks = dispatch.fair_picks(session, count, settings, now, among=among)
        taken = jobstore_queue.claim_dispatch(session, picks, now)
        session.commit()
    return taken, now


def _unclaim(settings: Settings, job_ids: list[str], at: datetime) -> None:
    with get_sessionmaker(settings.database_url)() as session:
        jobstore_queue.unclaim_dispatch(session, job_ids, at)
        session.commit()


def _run(
    settings: Settings,
    claims: list[jobstore.Claim],
    group: str,
    engine: Any,
    scale: int,
    outcomes: dict[str, str],
) -> str:
    """Run the group from ``scale``; the delivered job's (``claims[0]``) outcome. A member it did
    not settle (the group failed as a whole, or the job could not go on in it) goes back to the
    queue to run alone (``settle.hand_back(alone=True)``): no attempt used, its own delivery and time
    limit, on any worker, and never into a group again to fail there again.

    Every member's watcher (heartbeat, cancel, fencing) runs from before its inputs are read until
    it is settled or given back; the checkpoint uploads of all are settled first (a shutdown's
    checkpoint is recorded before its hand-back; a member given back resumes from its latest)."""
    storage = open_storage(settings)
    delivered = claims[0].job_id
    raised: BaseException | None = None  # the delivered job's transient error, raised on at the end
    with ExitStack() as watching:
        watchers = watch_all(settings, claims, watching, outcomes)
        with ExitStack() as saving:
            members = prepare_members(settings, storage, watchers, saving, outcomes, delivered, scale)
            results = _run_engine(engine, members, group) if members else None
        if results is not None:
            try:
                settle_all(settings, storage, members, results, delivered, group, outcomes)
            except TRANSIENT as exc:  # its guard gave it back; the others still go back alone first
                if not gave_back(exc, claims[0]):
                    raise
                raised, outcomes[delivered] = exc, "transient"
        # the delivered job last: its transient error is raised on (its task retries it)
        for claim, _, watcher in sorted(watchers, key=lambda w: w[0].job_id == delivered):
            if claim.job_id not in outcomes:
                outcomes[claim.job_id] = _back_alone(settings, claim, watcher, claim.job_id == delivered)
                log_event(claim.job_id, claim.attempt, "group_member_ended", group=group, outcome="alone")
    for claim in claims:  # its transient error counted, its release failed: once more
        if outcomes.get(claim.job_id) == UNRELEASED:
            best_effort(claim.job_id, claim.attempt, lambda c=claim: give_back(settings, c, counted=True))
    if raised is not None:
        raise raised
    return outcomes[delivered]


def _back_alone(settings: Settings, claim: jobstore.Claim, watcher: Watcher, delivered: bool) -> str:
    """An unsettled member back to the queue to run alone; one canceled or fenced meanwhile (its
    watcher saw it) ends as it would alone."""
    if watcher.stop in (StopReason.CANCELED, StopReason.FENCED):
        reason = watcher.stop
        return guarded(settings, claim, lambda: stopped(settings, claim, reason), retried=delivered)

    def back() -> str:
        return hand_back(settings, claim, delivered=delivered, alone=True)

    return guarded(settings, claim, back, retried=delivered)


def _run_engine(engine: Any, members: list[Member], group: str) -> list[GroupOutcome] | None:
    """``engine.run_group``; None when the group as a whole failed; a time limit ends every member."""
    from worker.engine.groups import GroupOutcome

    try:
        results: list[GroupOutcome] = engine.run_group([m.job for m in members], members[0].shared)
        return results
    except SoftTimeLimitExceeded as exc:  # the delivery's limit: every member ran past it
        return [GroupOutcome(error=exc) for _ in members]
    except GroupAborted as exc:  # the limit landed in a member's callback (batch_members.EarlyCancel)
        return [GroupOutcome(error=exc.__cause__ or exc) for _ in members]
    except Exception as exc:  # noqa: BLE001 - the group failed as a whole: each job runs alone
        first = members[0].claim
        error = repr(exc)[:200]
        log_event(first.job_id, first.attempt, "group_failed", logging.WARNING, group=group, error=error)
        return None


__all__ = ["TRANSIENT", "batch_limit", "gather", "run_grouped"]
