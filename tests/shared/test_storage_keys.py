"""Object keys and media types: the exact strings objects are stored under (earlier versions wrote
them too, so a change here loses stored images, results and checkpoints)."""

from __future__ import annotations

from typing import get_args

from shared import storage_keys as keys
from shared.imagecheck import ALLOWED_FORMATS
from shared.params import OutputFormat

JOB = "0f8e4c1a-job"


def test_keys_keep_their_stored_shape() -> None:
    assert keys.image_key("ab" * 32) == f"images/{'ab' * 32}"
    assert keys.result_key(JOB, 2, "png") == f"jobs/{JOB}/result.a2.png"
    assert keys.result_key(JOB, 1, "jpeg") == f"jobs/{JOB}/result.a1.jpg"
    assert keys.result_key(JOB, 3, "webp") == f"jobs/{JOB}/result.a3.webp"
    assert keys.checkpoint_key(JOB, 40) == f"jobs/{JOB}/checkpoints/40.pt"
    assert keys.preview_key(JOB, 40) == f"jobs/{JOB}/checkpoints/40.png"
    assert keys.thumb_key(JOB, 40) == f"jobs/{JOB}/checkpoints/40.thumb.jpg"
    assert keys.result_thumb_key(JOB, 2) == f"jobs/{JOB}/result.a2.thumb.jpg"


def test_a_results_thumbnail_is_found_from_its_key() -> None:
    for fmt in ("png", "jpeg", "webp"):
        assert keys.result_thumb_of(keys.result_key(JOB, 3, fmt)) == keys.result_thumb_key(JOB, 3)
    for other in (keys.preview_key(JOB, 1), keys.image_key("ab"), f"jobs/{JOB}/result.png", "result.a1.png"):
        assert keys.result_thumb_of(other) is None, other
    assert keys.media_type(keys.result_thumb_key(JOB, 1)) == keys.THUMB_MEDIA_TYPE == "image/jpeg"
    assert keys.media_type(keys.thumb_key(JOB, 1)) == keys.THUMB_MEDIA_TYPE


def test_every_output_format_has_an_extension_and_a_media_type() -> None:
    formats = get_args(OutputFormat)
    assert set(formats) == set(keys.RESULT_EXTENSIONS)
    assert {f: keys.result_media_type(f) for f in formats} == {
        "png": "image/png",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
    }
    assert keys.RESULT_MEDIA_TYPES == ("image/png", "image/jpeg", "image/webp")


def test_media_types_by_key_and_by_upload_format() -> None:
    assert keys.media_type(keys.result_key(JOB, 1, "jpeg")) == "image/jpeg"
    assert keys.media_type(keys.checkpoint_key(JOB, 1)) == keys.CHECKPOINT_MEDIA_TYPE
    assert keys.media_type(keys.preview_key(JOB, 1)) == keys.PREVIEW_MEDIA_TYPE == "image/png"
    assert keys.media_type("jobs/x/result.a1.TIFF") == keys.DEFAULT_MEDIA_TYPE
    assert keys.media_type(keys.image_key("ab")) == "application/octet-stream"
    assert set(keys.FORMAT_MEDIA_TYPES) == set(ALLOWED_FORMATS)
