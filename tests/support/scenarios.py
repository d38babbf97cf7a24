"""Test bodies shared by both backends (called from test_server_stack.py and test_embedded_stack.py)."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
from PIL import Image

from shared import storage_keys
from shared.queue import make_celery, publish_job
from shared.storage_keys import THUMB_SUFFIX
from tests.support.stacks import LONG, TINY, Stack
from tests.support.waiting import wait_for
from worker.engine import Checkpoint


def upload(stack: Stack, images: dict[str, bytes], *names: str) -> list[str]:
    with stack.client() as c:
        return [str(c.upload_image(images[n], f"{n}.png")["id"]) for n in names]


def submit(
    stack: Stack,
    images: dict[str, bytes],
    params: dict[str, Any],
    contents: tuple[str, ...] = ("content_astronaut",),
) -> list[str]:
    ids = upload(stack, images, *contents, "style_hokusai_great_wave")
    with stack.client() as c:
        batch = c.submit_batch(ids[:-1], ids[-1:], params=params)
        return [str(j["id"]) for j in c.list_jobs(batch_id=batch["id"])]


def status(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as c:
        return c.get_job(job_id)


def wait_status(stack: Stack, job_id: str, wanted: set[str], timeout: float = 90) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = status(stack, job_id)
        return job if job["status"] in wanted else None

    try:
        return dict(wait_for(reached, timeout, f"job {job_id} to be {wanted}", interval=0.1))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{stack.log_tail()}") from None


def result_keys(stack: Stack, job_id: str) -> list[str]:
    # (no trailing "/": S3Storage.list_keys rejects a prefix ending in "/")
    keys = stack.storage().list_keys(f"jobs/{job_id}")  # type: ignore[attr-defined]
    names = [k for k in keys if k.rsplit("/", 1)[-1].startswith("result.")]
    return [k for k in names if not k.endswith(THUMB_SUFFIX)]


def result_thumb_keys(stack: Stack, job_id: str) -> list[str]:
    """The result thumbnails stored for the job (one per delivered attempt)."""
    keys = stack.storage().list_keys(f"jobs/{job_id}")  # type: ignore[attr-defined]
    return [k for k in keys if k.rsplit("/", 1)[-1].startswith("result.") and k.endswith(THUMB_SUFFIX)]


def fetch(stack: Stack, url: str) -> bytes:
    """A link from the API: its own route, relative without STYLEQUEUE_PUBLIC_URL (with the key),
    or a presigned S3 URL (without)."""
    if url.startswith("/"):
        url = stack.api_url + url
    if url.startswith(stack.api_url):
        with stack.client() as c:
            resp = c.http.get(url)
    else:
        resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, (url, resp.status_code, resp.text[:200])
    return resp.content


def batch_succeeds(stack: Stack, images: dict[str, bytes]) -> None:
    """Submit over HTTP, poll to succeeded, download the result and every checkpoint."""
    job_ids = submit(stack, images, TINY, ("content_astronaut", "content_chelsea_cat"))
    assert len(job_ids) == 2
    for job_id in job_ids:
        job = wait_status(stack, job_id, {"succeeded", "failed", "canceled"})
        assert job["status"] == "succeeded", job
        with stack.client() as c:
            path = c.download_result(job_id, stack.tmp / f"{job_id}.png")
        assert max(Image.open(path).size) == TINY["size"]
        row = stack.job(job_id)
        assert row.attempt == 1 and row.progress["fraction"] == 1.0
        # each scale's end; uploads are latest-only, so step 2's may be superseded before it is sent
        steps = [c["step"] for c in row.checkpoints]
        assert steps in ([2, 4], [4]), steps
        storage = stack.storage()
        for ref in row.checkpoints:
            ckpt = Checkpoint.from_bytes(storage.get_bytes(ref["key"]))
            assert ckpt.step == ref["step"]
            Image.open(io.BytesIO(storage.get_bytes(ref["preview_key"]))).verify()
        assert len(job["checkpoints"]) == 2
        for link in job["checkpoints"]:
            assert Checkpoint.from_bytes(fetch(stack, link["url"])).config_digest
            assert fetch(stack, link["preview_url"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert result_keys(stack, job_id) == [f"jobs/{job_id}/result.a{row.attempt}.png"]  # the raw attempt
        assert result_thumb_keys(stack, job_id) == [storage_keys.result_thumb_key(job_id, row.attempt)]


def cancel_queued_and_running(stack: Stack, images: dict[str, bytes], slots: int) -> None:
    """Fill every worker slot with long jobs, cancel a queued job, then a running one."""
    long_ids = submit(stack, images, LONG, ("content_astronaut", "content_chelsea_cat")[:slots])
    for job_id in long_ids:
        wait_status(stack, job_id, {"running"}, timeout=60)
    queued = submit(stack, images, TINY)[0]
    assert status(stack, queued)["status"] == "queued"
    with stack.client() as c:
        assert c.cancel(queued)["status"] == "canceled"
    target = long_ids[0]
    wait_for(lambda: stack.job(target).checkpoints, 60, "a first checkpoint", interval=0.1)
    with stack.client() as c:
        asked = time.monotonic()
        c.cancel(target)
    job = wait_status(stack, target, {"canceled", "succeeded", "failed"}, timeout=10)
    took = time.monotonic() - asked
    assert job["status"] == "canceled" and took < 2.5, (job["status"], took)
    row = stack.job(target)
    assert row.checkpoints and row.result_key is None and row.progress["fraction"] < 1
    for ref in row.checkpoints:  # checkpoints are kept
        assert stack.storage().exists(ref["key"]) and stack.storage().exists(ref["preview_key"])
    for job_id in long_ids[1:]:
        with stack.client() as c:
            c.cancel(job_id)
        wait_status(stack, job_id, {"canceled"}, timeout=10)
    # Every slot was busy, so the queued job waited in the table (no message for it, unless a
    # worker stopped in an earlier test still counted within its lease): no worker ever ran it.
    row = stack.job(queued)
    assert row.attempt == 0 and row.started_at is None, (row.published_at, row.attempt)
    assert f"job_id={queued} attempt=1" not in stack.worker_log.read_text()


def duplicate_delivery_dropped(stack: Stack, images: dict[str, bytes], reason: str) -> None:
    """The same job id published twice runs once: one attempt, one result object."""
    job_id = submit(stack, images, {**LONG, "iterations": 60})[0]
    wait_status(stack, job_id, {"running"}, timeout=60)
    publish_job(make_celery(stack.settings), job_id)
    job = wait_status(stack, job_id, {"succeeded", "failed", "canceled"})
    assert job["status"] == "succeeded"
    wait_for(
        lambda: f"job_id={job_id} attempt=- event=dropped reason={reason}" in stack.worker_log.read_text(),
        30,
        f"the duplicate to be dropped ({reason})",
    )
    assert stack.job(job_id).attempt == 1
    assert result_keys(stack, job_id) == [f"jobs/{job_id}/result.a1.png"]


def second_tenant_not_behind_first(stack: Stack, images: dict[str, bytes]) -> None:
    """With one slot busy with tenant A's batch, tenant B submits a job: the slot that frees next
    goes to B (nothing in flight), not to A's next job as it would in one FIFO queue."""
    from api.client import StyleQueueClient
    from tests.support.stacks import make_key

    contents = ("content_astronaut", "content_chelsea_cat") * 2
    a_jobs = submit(stack, images, {**LONG, "iterations": 60}, contents)
    wait_for(lambda: any(stack.job(j).status == "running" for j in a_jobs), 60, "A's first job", interval=0.1)
    with StyleQueueClient(stack.api_url, make_key(stack.settings), timeout=30) as b:
        names = ("content_astronaut", "style_hokusai_great_wave")
        ids = [str(b.upload_image(images[n], f"{n}.png")["id"]) for n in names]
        b_job = b.submit_batch(ids[:1], ids[1:], params=TINY)["job_ids"][0]
        waiting = [j for j in a_jobs if stack.job(j).started_at is None]
        assert len(waiting) >= 2, "A's jobs ran too fast to have a line when B submitted"
        wait_for(lambda: b.get_job(b_job)["status"] == "succeeded", 90, "B's job", interval=0.1)
    b_started = stack.job(b_job).started_at
    assert b_started is not None
    later = [stack.job(j).started_at for j in waiting]
    assert all(t is None or t > b_started for t in later), (b_started, later)  # B went first
    with stack.client() as c:  # leave the stack idle for the next test
        for job_id in a_jobs:
            if stack.job(job_id).status in ("queued", "running"):
                c.cancel(job_id)
    for job_id in a_jobs:
        wait_status(stack, job_id, {"canceled", "succeeded", "failed"}, timeout=30)
