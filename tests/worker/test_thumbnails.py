"""The small JPEG thumbnails the worker writes next to each checkpoint preview (the uploader thread) and
next to the result (worker.settle), and their deletion with the objects they belong to.

``THUMB_MAX_EDGE`` is lowered to 32 px here so that small images (96 x 64) show the downscaling."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared import storage_keys
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import Storage, open_storage
from tests.support.jobs import LoadJob, MakeJob
from tests.worker import fakes
from tests.worker.fakes import FakeResult
from worker import checkpoints, jobstore, settle, thumbs
from worker.engine import Checkpoint
from worker.watcher import Watcher

EDGE = 32


@pytest.fixture
def small_thumbs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_keys, "THUMB_MAX_EDGE", EDGE)


def stored_image(storage: Storage, key: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.get_bytes(key)))
    image.load()
    return image


def assert_thumbnail(storage: Storage, key: str, size: tuple[int, int]) -> None:
    image = stored_image(storage, key)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size)


def test_a_thumbnail_is_a_small_rgb_jpeg() -> None:
    assert (storage_keys.THUMB_MAX_EDGE, storage_keys.THUMB_FORMAT) == (256, "JPEG")
    assert storage_keys.THUMB_MEDIA_TYPE == "image/jpeg" and 75 <= storage_keys.THUMB_QUALITY <= 90
    rgba = Image.new("RGBA", (96, 48), (10, 200, 30, 128))
    small = Image.open(io.BytesIO(thumbs.thumbnail(rgba, EDGE)))
    assert (small.format, small.mode, small.size) == ("JPEG", "RGB", (32, 16))
    assert rgba.size == (96, 48)  # the image itself is left as it is
    tiny = Image.open(io.BytesIO(thumbs.thumbnail(Image.new("RGB", (40, 20)))))
    assert tiny.size == (40, 20)  # never enlarged


def checkpoint(step: int) -> Checkpoint:
    """A checkpoint whose image is 96 x 64."""
    return fakes.checkpoint(step, hw=(64, 96))


def test_each_checkpoint_upload_writes_its_thumbnail_and_pruning_deletes_it(
    settings: Settings, make_job: MakeJob, load_job: LoadJob, small_thumbs: None
) -> None:
    url, job_id = settings.database_url, make_job()
    claim = jobstore.claim(url, job_id, "cpu@h#1", 60)
    assert isinstance(claim, jobstore.Claim)
    storage = open_storage(settings)
    with checkpoints.CheckpointSaver(storage, url, claim, Watcher(settings, job_id, 1), 1) as saver:
        saver(checkpoint(2))
        assert saver.flush(30)
        (ref,) = load_job(job_id).checkpoints
        assert (
            ref["thumb_key"] == storage_keys.thumb_key(job_id, 2) == f"jobs/{job_id}/checkpoints/2.thumb.jpg"
        )
        assert_thumbnail(storage, ref["thumb_key"], (32, 21))
        assert stored_image(storage, ref["preview_key"]).size == (96, 64)  # the preview stays full size
        saver(checkpoint(4))  # keep 1: step 2's objects go, its thumbnail too
        assert saver.flush(30)
    assert [c["step"] for c in load_job(job_id).checkpoints] == [4]
    assert not storage.exists(ref["thumb_key"]) and not storage.exists(ref["key"])
    assert storage.exists(storage_keys.thumb_key(job_id, 4))


def deliver(settings: Settings, claim: jobstore.Claim, storage: Storage) -> str:
    result = FakeResult(Image.new("RGB", (96, 64), (200, 30, 30)))
    params = JobParams(**claim.params)
    return settle.deliver(settings, storage, claim, params, result, {"fraction": 1.0}, {"device": "cpu"})


def test_the_result_gets_a_thumbnail_and_an_earlier_attempts_pair_is_deleted(
    settings: Settings, make_job: MakeJob, load_job: LoadJob, small_thumbs: None
) -> None:
    url, job_id, storage = settings.database_url, make_job(), open_storage(settings)
    assert isinstance(jobstore.claim(url, job_id, "cpu@h#1", 60), jobstore.Claim)
    earlier = [storage_keys.result_key(job_id, 1, "png"), storage_keys.result_thumb_key(job_id, 1)]
    for key in earlier:  # attempt 1 uploaded its result, then died
        storage.put_bytes(key, b"stale")
    assert jobstore.release(url, job_id, 1, graceful=False)
    claim = jobstore.claim(url, job_id, "cpu@h#2", 60)
    assert isinstance(claim, jobstore.Claim) and claim.attempt == 2
    assert deliver(settings, claim, storage) == "succeeded"
    job = load_job(job_id)
    thumb = f"jobs/{job_id}/result.a2.thumb.jpg"
    assert job.result_key == f"jobs/{job_id}/result.a2.png" and job.execution is not None
    assert job.execution[storage_keys.RESULT_THUMB_FIELD] == thumb == storage_keys.result_thumb_key(job_id, 2)
    assert job.execution["device"] == "cpu"
    assert_thumbnail(storage, thumb, (32, 21))
    assert stored_image(storage, job.result_key).size == (96, 64)
    assert not any(storage.exists(key) for key in earlier)


def test_a_fenced_result_deletes_its_thumbnail_too(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, job_id, storage = settings.database_url, make_job(), open_storage(settings)
    claim = jobstore.claim(url, job_id, "cpu@h#1", 60)
    assert isinstance(claim, jobstore.Claim)
    written: list[str] = []
    real_put = storage.put_bytes

    def put(key: str, data: bytes, content_type: str | None = None) -> None:
        written.append(key)
        real_put(key, data, content_type)

    monkeypatch.setattr(storage, "put_bytes", put)
    monkeypatch.setattr(jobstore, "succeed", lambda *a, **k: False)  # a newer attempt took the job
    assert deliver(settings, claim, storage) == "fenced"
    assert written == [storage_keys.result_key(job_id, 1, "png"), storage_keys.result_thumb_key(job_id, 1)]
    assert not any(storage.exists(key) for key in written)
