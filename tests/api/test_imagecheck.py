"""Upload validation: format allow-list, header dimensions before decoding, truncation."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.errors import InvalidInput, PayloadTooLarge
from shared.imagecheck import inspect_image
from tests.support.images import image_bytes

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 4_000_000}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_accepts_allowed_formats(fmt: str) -> None:
    info = inspect_image(image_bytes(40, 30, fmt), **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)


def _code(data: bytes, **limits: int) -> str:
    with pytest.raises(InvalidInput) as exc:
        inspect_image(data, **(LIMITS | limits))
    assert exc.value.message  # a sentence a user can act on
    return exc.value.code


def test_rejections() -> None:
    png = image_bytes(64, 64)
    assert _code(b"not an image at all" * 10) == "not_an_image"
    assert _code(b"") == "not_an_image"
    assert _code(png[: len(png) // 2]) == "truncated"
    assert _code(image_bytes(256, 256, "JPEG")[:400]) == "truncated"
    assert _code(image_bytes(8, 100)) == "too_small"
    assert _code(image_bytes(32, 32, "ICO")) == "unsupported_format"
    assert _code(image_bytes(3000, 2000), max_pixels=5_000_000) == "too_many_pixels"


def test_too_many_bytes_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as exc:
        inspect_image(image_bytes(64, 64), max_bytes=10, max_pixels=10**6)
    assert exc.value.code == "too_many_bytes"


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # A 1-bit 20000x20000 PNG compresses to a few kB but decodes to 400 MP: never decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    assert _code(buf.getvalue(), max_pixels=40_000_000) == "too_many_pixels"


@pytest.mark.parametrize("orientation, upright", [(1, (96, 64)), (3, (96, 64)), (6, (64, 96)), (8, (64, 96))])
def test_exif_rotated_photo_reports_its_upright_size_like_the_engine(
    orientation: int, upright: tuple[int, int]
) -> None:
    """A phone photo stored sideways (EXIF Orientation 5-8): the API reports (and checks masks
    and narrow scales against) the size the engine uses after applying the orientation."""
    from api.masks import aspect_matches
    from worker.engine.images import load_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 80, 40)).save(buf, "JPEG", exif=exif.tobytes())
    info = inspect_image(buf.getvalue(), **LIMITS)
    engine = load_image(buf.getvalue())
    assert (info.width, info.height) == upright == engine.size
    portrait_mask = (64, 96)
    assert aspect_matches(portrait_mask, (info.width, info.height)) == (upright == (64, 96))
