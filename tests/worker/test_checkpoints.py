"""Checkpoint retention: only the latest ``checkpoints_keep`` refs and their objects survive."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from shared.storage import FolderStorage, Storage, StorageUnavailable, open_storage
from shared.storage_keys import CHECKPOINT_REF_KEYS
from tests.support.jobs import NODE, LoadJob, MakeJob
from tests.worker.fakes import FakeEngine, checkpoint
from worker import checkpoints, jobstore, runner
from worker.watcher import JobStopped, StopReason, Watcher

CKPT_PREFIX = "jobs/{}/checkpoints/"


def stored_checkpoints(settings: Settings, job_id: str) -> set[str]:
    storage = open_storage(settings)
    assert isinstance(storage, FolderStorage)
    return set(storage.list_keys(CKPT_PREFIX.format(job_id)))


def referenced(refs: list[dict[str, Any]]) -> set[str]:
    return {ref[field] for ref in refs for field in CHECKPOINT_REF_KEYS}


@pytest.fixture
def keep2(settings: Settings) -> Settings:
    return settings.model_copy(update={"checkpoints_keep": 2})


class SpyStorage:
    """Real folder storage that records deletes and can be told to fail them."""

    def __init__(self, inner: Storage, fail_deletes: bool = False) -> None:
        self.inner, self.fail_deletes = inner, fail_deletes
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        if self.fail_deletes:
            raise StorageUnavailable("S3 refused the delete")
        self.inner.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_only_the_latest_checkpoints_are_kept(
    keep2: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.scales, engine.iterations = 5, 2  # a checkpoint at each scale's end: steps 2, 4, ..., 10
    job_id = make_job()
    seen: list[tuple[int, set[str], set[str]]] = []
    real = checkpoints.CheckpointSaver.__call__

    def watch(self: checkpoints.CheckpointSaver, ckpt: Any) -> None:
        real(self, ckpt)
        assert self.flush(30)  # after each checkpoint's upload: what the row names and storage holds
        refs = load_job(job_id).checkpoints
        seen.append((len(refs), referenced(refs), stored_checkpoints(keep2, job_id)))

    monkeypatch.setattr(checkpoints.CheckpointSaver, "__call__", watch)
    assert runner.run_job(job_id, NODE, keep2) == "succeeded"
    job = load_job(job_id)
    assert [(c["seq"], c["step"]) for c in job.checkpoints] == [(3, 8), (4, 10)]
    assert stored_checkpoints(keep2, job_id) == referenced(job.checkpoints)
    assert len(referenced(job.checkpoints)) == 6  # two .pt, two .png and their two .thumb.jpg
    assert [n for n, _, _ in seen] == [1, 2, 2, 2, 2]
    assert all(named == held for _, named, held in seen)


def test_resume_after_pruning_continues_the_seq(
    keep2: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.scales, engine.iterations = 5, 2
    job_id = make_job()
    real = checkpoints.CheckpointSaver.__call__

    def crash_at_step_6(self: checkpoints.CheckpointSaver, ckpt: Any) -> None:
        real(self, ckpt)
        assert self.flush(30)  # every checkpoint recorded (none replaced by a newer one)
        if self.claim.attempt == 1 and ckpt.step == 6:
            raise ConnectionError("broker gone")  # transient: the job is given back

    monkeypatch.setattr(checkpoints.CheckpointSaver, "__call__", crash_at_step_6)
    with pytest.raises(ConnectionError):
        runner.run_job(job_id, NODE, keep2)
    assert [(c["seq"], c["step"]) for c in load_job(job_id).checkpoints] == [(1, 4), (2, 6)]
    assert runner.run_job(job_id, NODE, keep2) == "succeeded"
    assert engine.resumed_from == [None, 6]
    job = load_job(job_id)
    assert [(c["seq"], c["step"]) for c in job.checkpoints] == [(3, 8), (4, 10)]
    assert stored_checkpoints(keep2, job_id) == referenced(job.checkpoints)


def test_a_stale_attempt_deletes_nothing(
    keep2: Settings, engine: FakeEngine, make_job: MakeJob, load_job: LoadJob
) -> None:
    url = keep2.database_url
    job_id = make_job()
    claim = jobstore.claim(url, job_id, "cpu@h#1", 60)
    assert isinstance(claim, jobstore.Claim)
    storage = SpyStorage(open_storage(keep2))
    watch = Watcher(keep2, job_id, 1)
    with checkpoints.CheckpointSaver(storage, url, claim, watch, 2) as saver:
        for step in (2, 4):
            saver(checkpoint(step))
            assert saver.flush(30)
        before = load_job(job_id).checkpoints
        with get_sessionmaker(url)() as s:  # a newer attempt took the job over
            s.query(Job).filter(Job.id == job_id).update({"attempt": 2, "worker": "other@h#2"})
            s.commit()
        saver(checkpoint(6))  # its record is fenced out: the oldest ref (step 2) must survive
        assert saver.flush(30)
        with pytest.raises(JobStopped) as stopped:  # the loop sees it at its next callback
            watch.raise_if_stopped()
    assert stopped.value.reason is StopReason.FENCED and saver.last_step == 4
    assert storage.deleted == [] and load_job(job_id).checkpoints == before
    assert referenced(before) <= stored_checkpoints(keep2, job_id)


def test_a_failing_delete_does_not_fail_the_job(
    keep2: Settings,
    engine: FakeEngine,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    synchronous_checkpoints: None,
) -> None:
    engine.scales, engine.iterations = 3, 2
    spies: list[SpyStorage] = []
    real_open = open_storage  # what the runner calls (shared.storage's)

    def open_failing(s: Settings) -> Storage:
        spies.append(SpyStorage(real_open(s), fail_deletes=True))
        return spies[-1]

    monkeypatch.setattr(runner, "open_storage", open_failing)
    job_id = make_job()
    with caplog.at_level(logging.WARNING, logger=checkpoints.logger.name):
        assert runner.run_job(job_id, NODE, keep2) == "succeeded"
    job = load_job(job_id)
    assert [c["step"] for c in job.checkpoints] == [4, 6]
    first = f"jobs/{job_id}/checkpoints/2"
    deleted = [f"{first}.pt", f"{first}.png", f"{first}.thumb.jpg"]
    assert spies[0].deleted == deleted  # tried, failed, left behind
    assert f"{first}.pt" in stored_checkpoints(keep2, job_id)
    failed = [r.getMessage() for r in caplog.records if "event=checkpoint_delete_failed" in r.getMessage()]
    assert len(failed) == 3 and all(f"job_id={job_id}" in m for m in failed)
