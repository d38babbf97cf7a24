"""What the GPU group tests share (test_batch.py, test_batch_alone.py): batching on with the real
engine, jobs of one bucket, a shutdown at a given step, the resume steps of each group, and a wait
for heartbeats."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from shared.buckets import bucket_key
from shared.db import get_sessionmaker
from shared.models import Job
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.images import png
from tests.support.jobs import CONTENT, STYLE, MakeJob
from tests.support.waiting import wait_for
from worker import runner, settle
from worker.watcher import StopReason, Watcher

PARAMS = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 3}
BUCKET = bucket_key(JobParams(**PARAMS), (48, 48))  # the conftest's images are 48 x 48
BEAT_WAIT_S = 30.0  # heartbeats come every 0.2 s (conftest): a bound for a loaded machine


@pytest.fixture
def grouped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Batching on (4 per group) with the real engine; the inputs in storage; no dispatch pass."""
    storage = open_storage(settings)
    storage.put_bytes(f"images/{CONTENT}", png())
    storage.put_bytes(f"images/{STYLE}", png((255, 200, 0)))
    monkeypatch.setattr(runner, "refill", lambda _settings: None)
    return settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 0})


def bucket_jobs(make_job: MakeJob, n: int, **fields: Any) -> list[str]:
    fields.setdefault("bucket", BUCKET)
    fields.setdefault("params", PARAMS)
    return [make_job(**fields) for _ in range(n)]


def republished(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs handed back with a new message (no broker here)."""
    published: list[str] = []
    monkeypatch.setattr(settle, "publish_job", lambda _app, job_id: published.append(job_id))
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    return published


def hand_back_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Each job's first attempt stops at ``step`` as on a worker's shutdown: it checkpoints, then
    is handed back; the jobs published again (``republished``)."""
    published = republished(monkeypatch)
    stopped: set[str] = set()
    seen = Watcher.on_progress

    def on_progress(self: Watcher, p: Any) -> str | None:
        if p.step >= step and self.job_id not in stopped:
            stopped.add(self.job_id)
            self.stop = StopReason.SHUTDOWN
        return seen(self, p)

    monkeypatch.setattr(Watcher, "on_progress", on_progress)
    return published


def resumes(monkeypatch: pytest.MonkeyPatch) -> list[list[int | None]]:
    """The step each member of each group resumes from (None: fresh)."""
    from worker.engine import StyleTransfer

    groups: list[list[int | None]] = []
    run_group = StyleTransfer.run_group

    def spy(self: StyleTransfer, jobs: Any, config: Any, **kw: Any) -> Any:
        groups.append([j.resume.step if j.resume is not None else None for j in jobs])
        return run_group(self, jobs, config, **kw)

    monkeypatch.setattr(StyleTransfer, "run_group", spy)
    return groups


def heartbeats_go_on(settings: Settings, job_ids: list[str]) -> None:
    """Wait until each job's heartbeat is newer than it is now: its lease is kept."""

    def beats() -> list[Any]:
        with get_sessionmaker(settings.database_url)() as s:
            rows = dict(s.execute(select(Job.id, Job.heartbeat_at).where(Job.id.in_(job_ids))).all())
        return [rows[j] for j in job_ids]

    before = beats()
    wait_for(lambda: all(a != b for a, b in zip(beats(), before, strict=True)), BEAT_WAIT_S, "heartbeats")


__all__ = [
    "BUCKET",
    "PARAMS",
    "bucket_jobs",
    "grouped",
    "hand_back_at_step",
    "heartbeats_go_on",
    "republished",
    "resumes",
]
