"""What a tenant sees of a failure: engine messages as written, never an arbitrary exception's text."""

from __future__ import annotations

import logging

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded

from shared.settings import Settings
from shared.storage import StorageUnavailable
from tests.support.jobs import NODE, LoadJob, MakeJob
from tests.worker.fakes import FakeEngine
from worker import crashes, jobstore, runner
from worker.engine import EngineError, WeightsError
from worker.tasks import run_job

TORCH_TEXT = (
    "Given input size: (64x1x64). Calculated output size: (64x0x32). Output size is too "
    "small at /pytorch/aten/src/ATen/native/DilatedMaxPool2d.cpp:69 (torch internals)"
)


def test_unexpected_exception_is_logged_not_shown(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine.error = RuntimeError(TORCH_TEXT)
    job_id = make_job()
    with caplog.at_level(logging.INFO, logger="worker"):
        assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.status, job.error_code, job.error_message) == (
        "failed",
        "internal_error",
        crashes.INTERNAL_ERROR,
    )
    assert "Given input size" not in (job.error_message or "")
    crash = [r for r in caplog.records if "event=crash" in r.getMessage()]
    assert len(crash) == 1 and f"job_id={job_id}" in crash[0].getMessage()
    assert crash[0].levelno == logging.ERROR and crash[0].exc_info is not None
    assert "torch internals" in caplog.text  # the traceback, with the text, is in the log


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
            "out_of_memory",
        ),
        (SoftTimeLimitExceeded("SoftTimeLimitExceeded(True,) at /srv/worker/tasks.py"), "time_limit"),
    ],
)
def test_resource_limits_have_their_code_and_no_raw_text(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    exc: Exception,
    code: str,
) -> None:
    engine.error = exc
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.error_code, job.error_retryable) == (code, False)
    assert str(exc) not in (job.error_message or "") and "GiB" not in (job.error_message or "")
    assert "smaller size" in (job.error_message or "")  # actionable


@pytest.mark.parametrize("code", ["invalid_config", "image_too_narrow", "too_many_scales", "diverged"])
def test_engine_errors_fail_at_once_with_their_message(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    code: str,
) -> None:
    message = f"a message written for users ({code}): try a smaller size"
    engine.error = EngineError(code, message)
    job_id = make_job()
    assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.status, job.attempt, job.error_code, job.error_message, job.error_retryable) == (
        "failed",
        1,
        code,
        message,
        False,
    )


def test_worker_setup_errors_hide_server_details(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine.error = WeightsError("weights_unavailable", "weights file '/srv/models/vgg19.pth' does not exist")
    job_id = make_job()
    with caplog.at_level(logging.INFO, logger="worker"):
        assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.error_code, job.error_message, job.error_retryable) == (
        "weights_unavailable",
        crashes.WORKER_SETUP_ERROR,
        True,
    )
    assert any(
        f"job_id={job_id}" in r.getMessage() and "/srv/models" in r.getMessage() for r in caplog.records
    )


def test_invalid_params_name_the_field_without_pydantic_noise(
    settings: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
) -> None:
    job_id = make_job(params={"size": 32, "bogus": "<script>"})
    assert runner.run_job(job_id, NODE, settings) == "failed"
    message = load_job(job_id).error_message or ""
    assert "bogus" in message and "pydantic.dev" not in message and "<script>" not in message


def test_spent_retries_do_not_show_the_exception(
    settings: Settings,
    make_job: MakeJob,
    load_job: LoadJob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = make_job()
    got = jobstore.claim(settings.database_url, job_id, "cpu@h#1", 60)
    assert isinstance(got, jobstore.Claim)
    jobstore.release(settings.database_url, job_id, got.attempt, graceful=False)
    secret = "endpoint http://10.0.0.7:9000 bucket tenant-private refused"
    with caplog.at_level(logging.INFO, logger="worker"):
        run_job.on_failure(StorageUnavailable(secret), job_id, (job_id,), {}, None)
    job = load_job(job_id)
    assert (job.status, job.error_code, job.error_retryable) == ("failed", "unavailable", True)
    assert "10.0.0.7" not in (job.error_message or "") and "retries" in (job.error_message or "")
    assert any(f"job_id={job_id}" in r.getMessage() and "10.0.0.7" in r.getMessage() for r in caplog.records)
