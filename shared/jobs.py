"""Job states and the only place that says which transitions are allowed.

Terminal states (succeeded, failed, canceled) never change. A running job may go back to queued when
its worker gives it back (graceful shutdown) or when the reconciler finds its lease expired, and a new
attempt may take over a running job whose lease expired or whose holder died (running → running with
``attempt`` + 1). ``shared.jobstore`` builds the guard of every status change from this table.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    """Stored as these strings; ``str()`` and f-strings give the plain value."""

    #: Waiting for a worker (also after a hand-back or a requeue).
    QUEUED = "queued"
    #: Held by one attempt (``jobs.attempt``), which fences every write of its worker.
    RUNNING = "running"
    #: Finished with a result.
    SUCCEEDED = "succeeded"
    #: Finished with an error code.
    FAILED = "failed"
    #: Finished because the tenant canceled it.
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


INITIAL = JobStatus.QUEUED  # every job is created queued
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
            JobStatus.QUEUED,
            JobStatus.RUNNING,
        }  # a new attempt takes over a lost one
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class InvalidTransition(Exception):
    def __init__(self, current: JobStatus, new: JobStatus) -> None:
        super().__init__(f"a {current} job cannot become {new}")
        self.current, self.new = current, new


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in ALLOWED[current]


def sources_for(new: JobStatus) -> frozenset[JobStatus]:
    """The states from which ``new`` may be reached: used in guarded ``UPDATE ... WHERE status IN``."""
    return frozenset(s for s, targets in ALLOWED.items() if new in targets)


def check_transition(current: JobStatus, new: JobStatus) -> None:
    if not can_transition(current, new):
        raise InvalidTransition(current, new)
