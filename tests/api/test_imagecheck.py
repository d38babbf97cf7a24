"""Upload validation: format allow-list, header dimensions before decoding, truncation."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.errors import InvalidInput, PayloadTooLarge
from shared.imagecheck import inspect_image
from tests.api.conftest import image_bytes

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
