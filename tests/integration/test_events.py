"""Live events on real processes (the embedded default: ``stylequeue api`` and ``stylequeue worker``):
a job's stream from queued to succeeded, and ``stylequeue submit --wait`` following its batch's stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli import main
from tests.support import scenarios
from tests.support.stacks import LONG, TINY, Stack
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEADY = {**TINY, "iterations": 60}  # runs a few seconds: several polls (0.5 s) see it running


def test_a_jobs_stream_from_queued_to_succeeded(embedded_stack: Stack, images: dict[str, bytes]) -> None:
    stack = embedded_stack
    blocker = scenarios.submit(stack, images, LONG)[0]  # holds the one worker slot...
    scenarios.wait_status(stack, blocker, {"running"}, timeout=60)
    job_id = scenarios.submit(stack, images, STEADY)[0]  # ...so this one waits, queued
    seen: list[tuple[str, str]] = []
    with stack.client() as client:
        for event in client.job_events(job_id):
            job = event.json()
            seen.append((event.event, job["status"]))
            if len(seen) == 1:
                assert (event.event, job["status"]) == ("status", "queued"), seen
                client.cancel(blocker)  # frees the slot
    assert seen[-1] == ("completed", "succeeded"), seen
    assert ("status", "running") in seen and ("progress", "running") in seen, seen
    assert job["result_url"] and job["checkpoints"] and job["progress"]["fraction"] == 1.0
    assert {kind for kind, _ in seen} <= {"status", "progress", "checkpoint", "completed"}
    # the data is what GET /v1/jobs/{id} answers
    assert {k: v for k, v in scenarios.status(stack, job_id).items() if k != "queue"} == {
        k: v for k, v in job.items() if k != "queue"
    }
    log, line = stack.log_of("api"), f"job_id={job_id} attempt=- event=events_stream_closed reason=done"
    wait_for(lambda: line in log.read_text(), 10, "the stream's log line")


def test_submit_wait_follows_the_batch_stream(
    embedded_stack: Stack, images: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = embedded_stack
    files = []
    for name in ("content_astronaut", "content_chelsea_cat", "style_hokusai_great_wave"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(images[name])
        files.append(str(path))
    params = [arg for key, value in TINY.items() for arg in ("--param", f"{key}={value}")]
    argv = ["submit", files[0], files[1], "--style", files[2], *params, "--wait", "-o", str(tmp_path / "out")]
    code = main([*argv, "--url", stack.api_url, "--key", stack.key])
    out = capsys.readouterr().out
    assert code == 0, out + stack.log_tail()
    batch_id = out.split()[1].rstrip(":")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "content_astronaut__style_hokusai_great_wave.png",
        "content_chelsea_cat__style_hokusai_great_wave.png",
    ]
    log, line = stack.log_of("api"), f"event=events_stream_closed batch_id={batch_id} reason=done"
    wait_for(lambda: line in log.read_text(), 10, "the batch stream's log line")  # it was followed to the end
