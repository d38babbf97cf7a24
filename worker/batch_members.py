"""The members of a GPU group (worker.batch): each job prepared with its own watcher, inputs,
checkpoint to resume from and checkpoint saver; a cancel that ends it at once; its settlement once
the group has run. A job that cannot go on inside the group (its checkpoint starts it at another
scale, or the engine refuses its checkpoint) is left unsettled, its watcher running: worker.batch
gives it back to run alone."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from shared.params import JobParams
from shared.settings import Settings
from shared.storage import Storage
from worker import jobstore, metrics
from worker.checkpoints import CheckpointSaver, resume_point
from worker.config import at_run_size, job_params, load_inputs, scale_edges, transfer_config
from worker.engine.errors import GroupAborted
from worker.engine.group_resume import start_scale
from worker.settle import best_effort, deliver, execution, guarded, log_event, stopped
from worker.watcher import JobStopped, StopReason, Watcher, final_progress

if TYPE_CHECKING:
    from worker.engine import Checkpoint, Progress, TransferConfig
    from worker.engine.groups import GroupJob, GroupOutcome

logger = logging.getLogger(__name__)

ALONE = "alone"  # a member's outcome that is none yet: it goes back to run alone once the group has run


@dataclass
class Member:
    claim: jobstore.Claim
    params: JobParams
    config: TransferConfig  # the job's own, as a run of it alone has it
    shared: TransferConfig  # without its per-item values: what the group's members agree on
    job: GroupJob
    watcher: Watcher
    saver: CheckpointSaver
    exact_wh: tuple[int, int] | None = None  # ran at a snapped aspect: the result goes back to this


def give_back(settings: Settings, claim: jobstore.Claim, *, counted: bool = False) -> None:
    """Back to waiting, no attempt used (a no-op for a job that was settled meanwhile); ``counted``:
    the attempt's end was counted already (``settle.UNRELEASED``)."""
    if jobstore.release(settings.database_url, claim.job_id, claim.attempt, graceful=True, waiting=True):
        log_event(claim.job_id, claim.attempt, "ungrouped")
        if not counted:
            metrics.attempt_ended(claim.job_id, "handed_back")


def settle_all(
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
        if _refused(m, outcome):  # unsettled: it goes back to run alone (worker.batch)
            log_event(m.claim.job_id, m.claim.attempt, "group_resume_refused", logging.WARNING, group=group)
            continue

        def end(m: Member = m, outcome: GroupOutcome = outcome) -> str:
            return _settle(settings, storage, m, outcome, len(members), m.claim.job_id == delivered)

        ended = guarded(settings, m.claim, end, retried=m.claim.job_id == delivered)
        outcomes[m.claim.job_id] = ended
        m.watcher.close()  # settled: its heartbeat may stop
        log_event(m.claim.job_id, m.claim.attempt, "group_member_ended", group=group, outcome=ended)


def member_guarded(
    settings: Settings, claim: jobstore.Claim, action: Callable[[], str], *, retried: bool
) -> str:
    """``guarded`` for one member's step, but the delivery's time limit landing in it is raised on:
    it is the group's (worker.batch settles the delivered job with it and gives the others back),
    not this member's failure."""
    limit: list[SoftTimeLimitExceeded] = []

    def step() -> str:
        try:
            return action()
        except SoftTimeLimitExceeded as exc:
            limit.append(exc)
            return "time_limit"

    outcome = guarded(settings, claim, step, retried=retried)
    if limit:
        raise limit[0]
    return outcome


def watch_all(
    settings: Settings, claims: list[jobstore.Claim], stack: ExitStack, outcomes: dict[str, str]
) -> list[tuple[jobstore.Claim, JobParams, Watcher]]:
    """Each claim's params and a running watcher (a job whose params are bad is failed at once)."""
    watched = []
    for i, claim in enumerate(claims):
        found: list[tuple[jobstore.Claim, JobParams, Watcher]] = []

        def watch(claim: jobstore.Claim = claim, found: list[Any] = found) -> str:
            params = job_params(claim.params)
            watcher = Watcher(settings, claim.job_id, claim.attempt, 0, scale_edges(params))
            stack.enter_context(watcher)
            found.append((claim, params, watcher))
            return "watched"

        outcome = member_guarded(settings, claim, watch, retried=i == 0)
        if found:
            watched.extend(found)
        else:
            outcomes[claim.job_id] = outcome
    return watched


def prepare_members(
    settings: Settings,
    storage: Storage,
    watched: list[tuple[jobstore.Claim, JobParams, Watcher]],
    stack: ExitStack,
    outcomes: dict[str, str],
    delivered: str,
    scale: int,
) -> list[Member]:
    """Each watched job with its inputs, checkpoint and checkpoint saver (entered on ``stack``); a
    job whose inputs are bad, or whose config differs from the first's, is settled at once and left
    out; one whose checkpoint does not start it at the group's ``scale`` is left out unsettled.
    ``delivered``: the job whose message this is (its transient errors are raised: its task retries)."""
    from worker.engine.config import BatchItem
    from worker.engine.groups import GroupJob

    members: list[Member] = []
    for claim, params, watcher in watched:

        def prepare(
            claim: jobstore.Claim = claim, params: JobParams = params, watcher: Watcher = watcher
        ) -> str:
            config = transfer_config(params, settings)
            shared = _shared_config(config)
            if members and shared != members[0].shared:  # the bucket said yes, the configs say no
                give_back(settings, claim)
                return "handed_back"
            content, styles, inputs = load_inputs(storage, claim, settings)
            content, inputs, exact_wh = at_run_size(params, content, inputs)
            resume, step = resume_point(storage, claim)
            if start_scale(resume) != scale or scale >= len(scale_edges(params)):
                return ALONE  # it would start elsewhere (its checkpoint was unreadable, or its last)
            watcher.start_step = step
            saver = stack.enter_context(
                CheckpointSaver(storage, settings.database_url, claim, watcher, settings.checkpoints_keep)
            )
            item = BatchItem(content, styles, masks=inputs.get("masks"), **_item_weights(config))
            early = EarlyCancel(settings, claim, watcher)
            job = GroupJob(item, config.seed, early.on_progress, early.wrap(saver), config, resume)
            members.append(Member(claim, params, config, shared, job, watcher, saver, exact_wh))
            log_event(claim.job_id, claim.attempt, "started", resume_step=step)
            return "prepared"

        outcome = member_guarded(settings, claim, prepare, retried=claim.job_id == delivered)
        if outcome not in ("prepared", ALONE):  # settled; one to run alone keeps its watcher (lease)
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


class EarlyCancel:
    """A member's callbacks: a cancel its watcher saw ends the job at once (canceled, watcher
    stopped), while the group runs on without it; its settlement after the group says so."""

    def __init__(self, settings: Settings, claim: jobstore.Claim, watcher: Watcher) -> None:
        self.settings, self.claim, self.watcher = settings, claim, watcher

    def on_progress(self, p: Progress) -> str | None:
        try:
            try:
                return self.watcher.on_progress(p)
            except JobStopped as stop:
                self._stopped(stop)
                raise
        except SoftTimeLimitExceeded as exc:  # the delivery's limit, landed here: it ends every member
            raise GroupAborted() from exc

    def wrap(self, saver: CheckpointSaver) -> Callable[[Checkpoint], None]:
        def on_checkpoint(ckpt: Checkpoint) -> None:
            try:
                try:
                    saver(ckpt)
                except JobStopped as stop:
                    self._stopped(stop)
                    raise
            except SoftTimeLimitExceeded as exc:
                raise GroupAborted() from exc

        return on_checkpoint

    def _stopped(self, stop: JobStopped) -> None:
        if stop.reason is StopReason.CANCELED and self.watcher.stop is StopReason.CANCELED:
            url, job_id, attempt = self.settings.database_url, self.claim.job_id, self.claim.attempt
            best_effort(job_id, attempt, lambda: jobstore.cancel(url, job_id, attempt))
            self.watcher.close()


def _refused(m: Member, outcome: GroupOutcome) -> bool:
    """The engine refused the member's checkpoint (``checkpoint_mismatch``): a run alone starts afresh."""
    code = getattr(outcome.error, "code", None)
    return m.job.resume is not None and code in ("checkpoint_mismatch", "checkpoint_invalid")


def _settle(
    settings: Settings, storage: Storage, m: Member, outcome: GroupOutcome, size: int, delivered: bool
) -> str:
    if isinstance(outcome.error, JobStopped):
        return stopped(settings, m.claim, outcome.error.reason, m.saver.last_step, delivered=delivered)
    if outcome.error is not None and m.watcher.stop in (StopReason.CANCELED, StopReason.FENCED):
        return stopped(settings, m.claim, m.watcher.stop)  # it left before the group failed
    if outcome.error is not None:
        raise outcome.error  # guarded() makes it the job's outcome (an engine error, a crash)
    assert outcome.result is not None
    final = final_progress(m.watcher.progress_now(), outcome.result.metadata)
    ran = execution(outcome.result.metadata, size)
    return deliver(settings, storage, m.claim, m.params, outcome.result, final, ran, m.exact_wh)


__all__ = ["ALONE", "EarlyCancel", "Member", "give_back", "prepare_members", "settle_all", "watch_all"]
