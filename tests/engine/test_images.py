"""load_image validation and conversions, save_image."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from worker.engine import ImageError, load_image, save_image


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _code(source: object, **kw: int) -> str:
    with pytest.raises(ImageError) as e:
        load_image(source, **kw)  # type: ignore[arg-type]
    return e.value.code


def test_bad_inputs_have_codes(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = _png(noise)
    assert _code(b"hello, not an image" * 10) == "not_an_image"
    assert _code(data[: len(data) // 2]) == "truncated"
    assert _code(_png(Image.new("RGB", (1, 1)))) == "too_small"
    assert _code(_png_header(50_000, 50_000)) == "too_many_pixels"
    assert _code(_png_header(8000, 6000)) == "too_many_pixels"  # under Pillow's limit, over ours
    assert _code(data, max_bytes=100) == "too_many_bytes"
    path = tmp_path / "big.png"
    path.write_bytes(data)
    assert _code(path, max_bytes=100) == "too_many_bytes"
    assert _code(tmp_path / "missing.png") == "not_an_image"
    for fmt in ("PPM", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format=fmt)
        assert _code(buf.getvalue()) == "unsupported_format"


def test_messages_are_actionable() -> None:
    with pytest.raises(ImageError, match=r"1×1 pixels; images must be at least 16×16"):
        load_image(_png(Image.new("RGB", (1, 1))))
    with pytest.raises(ImageError, match="supported formats are PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="PPM")
        load_image(buf.getvalue())


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_modes_convert_to_rgb(mode: str) -> None:
    im = Image.new("RGB", (24, 24), (10, 200, 30)).convert(mode)
    if mode == "I;16":
        im = Image.fromarray(np.full((24, 24), 65535, np.uint16))
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (24, 24)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)


def test_transparency_is_composited_on_white() -> None:
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert load_image(_png(im)).getpixel((5, 5)) == (255, 255, 255)


def test_icc_profile_and_gif_first_frame() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 60, 30)).save(buf, format="PNG", icc_profile=icc)
    px = load_image(buf.getvalue()).getpixel((1, 1))
    assert all(abs(a - b) <= 2 for a, b in zip(px, (120, 60, 30), strict=True))  # type: ignore[arg-type]
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif.getvalue()).getpixel((1, 1)) == (255, 0, 0)


def test_save_image_formats(tmp_path: Path) -> None:
    im = Image.new("RGB", (20, 20), (1, 2, 3))
    for suffix, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")):
        save_image(im, tmp_path / f"o{suffix}")
        assert Image.open(tmp_path / f"o{suffix}").format == fmt
    buf = io.BytesIO()
    save_image(im, buf, format="jpeg", quality=80)
    assert Image.open(buf).format == "JPEG"
    with pytest.raises(ImageError):
        save_image(im, tmp_path / "o.gif")
