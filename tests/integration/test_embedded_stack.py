"""The embedded default (SQLite, kombu's SQL transport, a folder): real worker and API processes."""

from __future__ import annotations

import pytest

from tests.support import scenarios
from tests.support.stacks import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_worker_created_and_migrated_the_data_folder(embedded_stack: Stack) -> None:
    data = embedded_stack.settings.data_dir
    assert (data / "stylequeue.db").is_file() and (data / "broker.db").is_file()


def test_batch_succeeds_with_result_and_checkpoints(embedded_stack: Stack, images: dict[str, bytes]) -> None:
    scenarios.batch_succeeds(embedded_stack, images)


def test_cancel_queued_and_running_jobs(embedded_stack: Stack, images: dict[str, bytes]) -> None:
    scenarios.cancel_queued_and_running(embedded_stack, images, slots=1)


def test_duplicate_delivery_is_dropped(embedded_stack: Stack, images: dict[str, bytes]) -> None:
    # One pool process: the duplicate is delivered after the job ended.
    scenarios.duplicate_delivery_dropped(embedded_stack, images, reason="terminal")


def test_a_second_tenant_is_not_queued_behind_the_first(
    embedded_stack: Stack, images: dict[str, bytes]
) -> None:
    scenarios.second_tenant_not_behind_first(embedded_stack, images)
