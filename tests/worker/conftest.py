"""Worker unit tests: a migrated SQLite database with one tenant, two images, job factories and a fake
engine (with both images in folder storage)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.models import Job, StoredImage, Tenant
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.images import png
from tests.support.jobs import CONTENT, STYLE
from tests.worker.fakes import FakeEngine
from worker import checkpoints, runner


@pytest.fixture
def settings(settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    s = settings_factory(
        data_dir=tmp_path / "data",
        weights="random",
        device="cpu",
        progress_interval_s=0.1,
        heartbeat_s=0.2,
        lease_s=30,
    )
    upgrade(s.database_url)
    with get_sessionmaker(s.database_url)() as session:
        session.add(Tenant(id="t1", name="t1"))
        for image_id in (CONTENT, STYLE):
            session.add(
                StoredImage(
                    id=image_id, format="PNG", width=48, height=48, bytes=1, storage_key=f"images/{image_id}"
                )
            )
        session.commit()
    return s


@pytest.fixture
def make_job(settings: Settings) -> Callable[..., str]:
    def make(**fields: Any) -> str:
        fields.setdefault("params", {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 2})
        job = Job(tenant_id="t1", content_image_id=CONTENT, style_image_ids=[STYLE], **fields)
        with get_sessionmaker(settings.database_url)() as session:
            session.add(job)
            session.commit()
            return job.id

    return make


@pytest.fixture
def load_job(settings: Settings) -> Callable[[str], Job]:
    def load(job_id: str) -> Job:
        with get_sessionmaker(settings.database_url)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    return load


@pytest.fixture
def engine(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """The runner's engine, faked; the job's two input images are in storage."""
    fake = FakeEngine()
    monkeypatch.setattr(runner, "get_engine", lambda _s: fake)
    storage = open_storage(settings)
    storage.put_bytes(f"images/{CONTENT}", png())
    storage.put_bytes(f"images/{STYLE}", png((255, 200, 0)))
    return fake


@pytest.fixture
def synchronous_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each checkpoint's upload is waited for in ``on_checkpoint``, as before uploads ran in the
    background: for tests that count every checkpoint a run records (latest-only uploads may
    otherwise drop one a newer one replaced before its upload began)."""
    handed_over = checkpoints.CheckpointSaver.__call__

    def call_and_flush(self: checkpoints.CheckpointSaver, ckpt: Any) -> None:
        try:
            handed_over(self, ckpt)
        finally:  # also when the call stops the run (JobStopped)
            assert self.flush(30), "a checkpoint upload did not finish"

    monkeypatch.setattr(checkpoints.CheckpointSaver, "__call__", call_and_flush)
