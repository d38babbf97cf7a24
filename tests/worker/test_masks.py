"""The runner and content masks (spatial control): loaded from storage, passed in style order, and
only when the job has them."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, cast

import pytest
import torch
from PIL import Image

from shared.db import get_sessionmaker
from shared.models import Job
from shared.settings import Settings
from shared.storage import open_storage
from tests.support.jobs import CONTENT, NODE, STYLE, LoadJob, MakeJob
from tests.worker.fakes import FakeEngine, FakeResult
from worker import jobstore, runner
from worker.engine import Checkpoint, EngineError

STYLE2, MASK_A, MASK_B = "2" * 64, "a" * 64, "b" * 64


def levels(im: Image.Image) -> tuple[int, int]:
    """(min, max) luminance of a mask as the engine got it."""
    lo, hi = cast("tuple[int, int]", im.convert("L").getextrema())  # one band: (min, max)
    return int(lo), int(hi)


def grey(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (48, 48), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def masked_job(settings: Settings, engine: FakeEngine) -> Any:
    """A two-style job with one mask per style (B for the first style, A for the second: the
    order is the job's, not the ids'); the second style and both masks are in storage."""
    storage = open_storage(settings)
    storage.put_bytes(f"images/{STYLE2}", grey(90))
    storage.put_bytes(f"images/{MASK_A}", grey(255))
    storage.put_bytes(f"images/{MASK_B}", grey(60))

    def make(masks: Sequence[str] | None = (MASK_B, MASK_A), **fields: Any) -> str:
        job = Job(
            tenant_id="t1",
            content_image_id=CONTENT,
            style_image_ids=[STYLE, STYLE2],
            mask_image_ids=None if masks is None else list(masks),
            params={"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 2},
            **fields,
        )
        with get_sessionmaker(settings.database_url)() as session:
            session.add(job)
            session.commit()
            return job.id

    return make


def test_masks_are_passed_in_style_order(
    settings: Settings, engine: FakeEngine, masked_job: Any, load_job: LoadJob
) -> None:
    job_id = masked_job()
    claim = jobstore.claim(settings.database_url, job_id, "probe#1", 30)
    assert isinstance(claim, jobstore.Claim) and claim.mask_image_ids == [MASK_B, MASK_A]
    jobstore.release(settings.database_url, job_id, claim.attempt, graceful=True)
    assert runner.run_job(job_id, NODE, settings) == "succeeded", load_job(job_id).error_message
    # decoded under the service's limits, one per style, in the job's order
    assert [[levels(m) for m in ms] for ms in engine.masks] == [[(60, 60), (255, 255)]]
    assert len(engine.styles[0]) == 2


def test_no_masks_passes_none(settings: Settings, engine: FakeEngine, make_job: MakeJob) -> None:
    job_id = make_job()
    claim = jobstore.claim(settings.database_url, job_id, "probe#1", 30)
    assert isinstance(claim, jobstore.Claim) and claim.mask_image_ids is None
    jobstore.release(settings.database_url, job_id, claim.attempt, graceful=True)
    assert runner.run_job(job_id, NODE, settings) == "succeeded"
    assert engine.masks == [None]


class EngineWithoutMasks(FakeEngine):
    """Today's engine: ``run`` has no ``masks`` keyword at all."""

    def run(  # type: ignore[override]
        self,
        content: Any,
        styles: Any,
        config: Any,
        *,
        on_progress: Any = None,
        on_checkpoint: Any = None,
        resume: Checkpoint | None = None,
    ) -> FakeResult:
        return super().run(
            content, styles, config, on_progress=on_progress, on_checkpoint=on_checkpoint, resume=resume
        )


def test_a_job_without_masks_runs_on_an_engine_without_the_keyword(
    settings: Settings,
    engine: FakeEngine,
    masked_job: Any,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = EngineWithoutMasks()
    monkeypatch.setattr(runner, "get_engine", lambda _s: old)
    job_id = masked_job(masks=None)
    assert runner.run_job(job_id, NODE, settings) == "succeeded", load_job(job_id).error_message
    assert old.masks == [None]


def test_a_missing_mask_fails_the_job_with_input_missing(
    settings: Settings, engine: FakeEngine, masked_job: Any, load_job: LoadJob
) -> None:
    job_id = masked_job(masks=[MASK_B, "d" * 64])
    assert runner.run_job(job_id, NODE, settings) == "failed"
    job = load_job(job_id)
    assert (job.status, job.error_code) == ("failed", "input_missing")
    assert "d" * 64 in (job.error_message or "") and job.error_retryable is False
    assert engine.masks == []  # the engine never ran


def test_the_engine_refusing_masks_fails_the_job_with_its_code(
    settings: Settings, engine: FakeEngine, masked_job: Any, load_job: LoadJob
) -> None:
    job_id = masked_job(masks=[MASK_A])  # one mask for two styles: the engine's invalid_mask
    assert runner.run_job(job_id, NODE, settings) == "failed"
    assert load_job(job_id).error_code == "invalid_mask"


class RefusesCheckpoints(FakeEngine):
    def run(self, content: Any, styles: Any, config: Any, **kwargs: Any) -> FakeResult:
        if kwargs.get("resume") is not None:
            self.masks.append(kwargs.get("masks"))
            raise EngineError("checkpoint_mismatch", "settings changed")
        return super().run(content, styles, config, **kwargs)


def test_masks_are_passed_again_when_a_checkpoint_is_skipped(
    settings: Settings, masked_job: Any, load_job: LoadJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = RefusesCheckpoints()
    monkeypatch.setattr(runner, "get_engine", lambda _s: fake)
    ckpt = Checkpoint(
        scale=0,
        iteration=3,
        step=3,
        image=torch.rand(1, 3, 16, 16),
        optimizer_state=None,
        config_digest="d",
        end_of_scale=True,
    )
    open_storage(settings).put_bytes("jobs/x/checkpoints/3.pt", ckpt.to_bytes())
    job_id = masked_job(checkpoints=[{"key": "jobs/x/checkpoints/3.pt", "step": 3, "seq": 0}])
    assert runner.run_job(job_id, NODE, settings) == "succeeded", load_job(job_id).error_message
    # the refused resume, then the fresh start
    assert [[levels(m) for m in ms] for ms in fake.masks] == [[(60, 60), (255, 255)]] * 2


def test_a_masked_job_runs_on_the_real_engine(
    settings: Settings,
    engine: FakeEngine,
    masked_job: Any,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stored mask bytes go to the real engine (random weights, 32 px) and the job succeeds."""
    from worker.engine import StyleTransfer

    real = StyleTransfer(weights="random", device="cpu", seed=0)
    monkeypatch.setattr(runner, "get_engine", lambda _s: real)
    job_id = masked_job()
    assert runner.run_job(job_id, NODE, settings) == "succeeded", load_job(job_id).error_message
    assert not engine.masks  # the fake was not used
