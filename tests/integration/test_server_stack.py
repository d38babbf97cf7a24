"""PostgreSQL + Redis + S3 (moto): real ``stylequeue worker`` and ``stylequeue api`` processes."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support import scenarios
from tests.support.stacks import LONG, Stack
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_batch_succeeds_with_result_and_checkpoints(server_stack: Stack, images: dict[str, bytes]) -> None:
    scenarios.batch_succeeds(server_stack, images)


def test_cancel_queued_and_running_jobs(server_stack: Stack, images: dict[str, bytes]) -> None:
    scenarios.cancel_queued_and_running(server_stack, images, slots=2)


def test_duplicate_delivery_of_running_job_is_dropped(server_stack: Stack, images: dict[str, bytes]) -> None:
    # Two pool processes: the duplicate reaches the idle one while the job runs in the other.
    scenarios.duplicate_delivery_dropped(server_stack, images, reason="running_elsewhere")


def test_killed_pool_process_redelivers_until_attempts_are_spent(
    server_stack: Stack, images: dict[str, bytes]
) -> None:
    stack = server_stack
    job_id = scenarios.submit(stack, images, LONG)[0]
    scenarios.wait_status(stack, job_id, {"running"}, timeout=60)
    stack.update_job(job_id, max_attempts=1)
    holder = stack.job(job_id).worker
    assert holder and "#" in holder
    os.kill(int(holder.rsplit("#", 1)[1]), signal.SIGKILL)  # the pool process running the job
    # Redis redelivers at once (reject on worker lost); the new delivery sees the dead holder on this
    # host and the spent attempts.
    job = scenarios.wait_status(stack, job_id, {"failed", "succeeded", "canceled"}, timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert stack.job(job_id).attempt == 1
    assert stack.procs["worker"].poll() is None  # the worker itself lives on


def test_graceful_shutdown_hands_job_back_and_resumes(server_stack: Stack, images: dict[str, bytes]) -> None:
    stack = server_stack
    job_id = scenarios.submit(stack, images, {**LONG, "iterations": 150})[0]
    scenarios.wait_status(stack, job_id, {"running"}, timeout=60)
    wait_for(lambda: stack.job(job_id).checkpoints, 60, "a first checkpoint", interval=0.1)
    assert stack.stop_worker() == 0  # SIGTERM: warm shutdown, the running job is handed back
    row = stack.job(job_id)
    assert (row.status, row.attempt, row.max_attempts) == ("queued", 1, 4)
    step = row.checkpoints[-1]["step"]
    stack.start_worker("--concurrency", "2")
    job = scenarios.wait_status(stack, job_id, {"succeeded", "failed", "canceled"}, timeout=90)
    assert job["status"] == "succeeded", job
    assert stack.job(job_id).attempt == 2
    assert f"job_id={job_id} attempt=2 event=resuming step={step}" in stack.worker_log.read_text()
