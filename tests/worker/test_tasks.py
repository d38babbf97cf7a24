"""The Celery task is a thin adapter: retries declared on it, the runner does the rest."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from shared.queue import RUN_JOB_TASK
from shared.settings import Settings
from shared.storage import StorageUnavailable
from tests.support.jobs import LoadJob, MakeJob
from worker import jobstore
from worker.tasks import app, run_job


def test_task_is_registered_with_retries_for_transient_errors() -> None:
    task = app.tasks[RUN_JOB_TASK]
    assert task.name == run_job.name == RUN_JOB_TASK
    for exc in (StorageUnavailable, OperationalError, ConnectionError):
        assert exc in task.autoretry_for
    assert task.retry_backoff and task.retry_jitter and task.max_retries >= 3
    assert task.acks_late


def test_spent_retries_fail_a_released_job(settings: Settings, make_job: MakeJob, load_job: LoadJob) -> None:
    job_id = make_job()
    got = jobstore.claim(settings.database_url, job_id, "cpu@h#1", 60)
    assert isinstance(got, jobstore.Claim)
    jobstore.release(settings.database_url, job_id, got.attempt, graceful=False)
    run_job.on_failure(StorageUnavailable("S3 down"), job_id, (job_id,), {}, None)
    job = load_job(job_id)
    assert (job.status, job.error_code, job.error_retryable) == ("failed", "unavailable", True)
    assert "retries" in (job.error_message or "")  # the exception's own text: tests/worker/test_errors.py
