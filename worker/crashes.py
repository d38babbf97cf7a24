"""What a crash tells the tenant: the code, message and retryability of an exception nothing else
handled, and of a worker that is not set up to run jobs. Never the exception's own text (torch
internals, paths, SQL): that is logged under the job's id (worker.settle)."""

from __future__ import annotations

import torch
from celery.exceptions import SoftTimeLimitExceeded

WORKER_SETUP_CODES = frozenset({"weights_unavailable", "weights_invalid", "device_unavailable"})
WORKER_SETUP_ERROR = (
    "the worker is not set up to run jobs (model weights or device); the error was "
    "logged with this job's id. Submit the job again later"
)
INTERNAL_ERROR = (
    "the worker failed unexpectedly; the error was logged with this job's id "
    "(quote it when reporting the problem)"
)


def classify_crash(exc: Exception) -> tuple[str, str, bool]:
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
