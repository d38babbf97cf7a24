"""Job states and the only place that says which transitions are allowed.

Terminal states (succeeded, failed, canceled) never change. A running job may go back to queued when
its worker gives it back (graceful shutdown) or when the reconciler finds its lease expired.
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class InvalidTransition(Exception):
    def __init__(self, current: JobStatus, new: JobStatus) -> None:
        super().__init__(f"a {current.value} job cannot become {new.value}")
        self.current, self.new = current, new


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in ALLOWED[current]


def sources_for(new: JobStatus) -> frozenset[JobStatus]:
    """The states from which ``new`` may be reached: used in guarded ``UPDATE ... WHERE status IN``."""
    return frozenset(s for s, targets in ALLOWED.items() if new in targets)


def check_transition(current: JobStatus, new: JobStatus) -> None:
    if not can_transition(current, new):
        raise InvalidTransition(current, new)
