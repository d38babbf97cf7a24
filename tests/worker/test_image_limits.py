"""The API's upload check and the worker's decode give every file the same verdict.

One corpus of bad (and good) files, built here, goes through the API's inspection
(``api.imagestore.validate_uploads``, which ``POST /v1/images`` and the job and batch routes call) and
through the worker's loader (``worker.config.load_input_image``: the engine's ``load_image`` under the
service's limits). Both must give the same code for every file. With the limits raised above the
engine's own defaults, an image just under them passes both: before the worker used the service's
limits, the API accepted such images and every worker then failed the job.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from api.imagestore import validate_uploads
from shared import imagecheck
from shared.errors import DomainError
from shared.settings import Settings
from worker.config import load_input_image
from worker.engine import images as engine_images
from worker.engine import load_image
from worker.engine.errors import ImageError

MakeSettings = Callable[..., Settings]


def encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` in its header (its pixel data is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def scan_bomb(progressive_jpeg: bytes, repeats: int) -> bytes:
    """A progressive JPEG with its last scan repeated: a small file that decodes for a long time."""
    last_scan = progressive_jpeg.rfind(b"\xff\xda")
    end = progressive_jpeg.rfind(b"\xff\xd9")
    return progressive_jpeg[:end] + progressive_jpeg[last_scan:end] * repeats + progressive_jpeg[end:]


def corpus(max_bytes: int) -> dict[str, tuple[bytes, str]]:
    """name -> (file, the code both sides must give; "ok" when both accept it)."""
    noise = Image.frombytes("RGB", (64, 64), bytes(i * 7919 % 251 for i in range(64 * 64 * 3)))
    small = Image.new("RGB", (64, 48), (10, 200, 30))
    png, jpeg = encoded(noise, "PNG"), encoded(noise, "JPEG")
    progressive = encoded(noise, "JPEG", progressive=True)
    webp, gif = encoded(noise, "WEBP"), encoded(noise.convert("P"), "GIF")
    return {
        "text": (b"hello, this is not an image" * 10, "not_an_image"),
        "empty": (b"", "not_an_image"),
        "zeros": (bytes(1024), "not_an_image"),
        "png_signature_only": (png[:8], "not_an_image"),
        "png_header_cut_short": (png[:20], "truncated"),
        "png_cut_in_pixel_data": (png[: len(png) // 2], "truncated"),
        "jpeg_header_cut_short": (jpeg[:10], "truncated"),
        "jpeg_cut_in_scan": (jpeg[: len(jpeg) // 2], "truncated"),
        "progressive_jpeg_cut": (progressive[: len(progressive) // 2], "truncated"),
        "webp_cut": (webp[: len(webp) // 2], "truncated"),
        "gif_cut_in_palette": (gif[:100], "not_an_image"),
        "gif_cut_in_image_data": (gif[: len(gif) // 2], "truncated"),
        "too_small_side": (encoded(Image.new("RGB", (8, 64)), "PNG"), "too_small"),
        "too_small_both": (encoded(Image.new("RGB", (15, 15)), "PNG"), "too_small"),
        "too_many_pixels_by_header": (png_header(8000, 8000), "too_many_pixels"),
        "decompression_bomb": (png_header(100_000, 100_000), "too_many_pixels"),
        "jpeg_scan_bomb": (scan_bomb(progressive, 30), "too_many_scans"),
        "too_many_bytes": (png + bytes(max_bytes + 1 - len(png)), "too_many_bytes"),
        **{
            f"unsupported_{fmt.lower()}": (encoded(small, fmt), "unsupported_format")
            for fmt in ("ICO", "PPM", "TGA", "PCX", "SGI")
        },
        **{f"good_{fmt.lower()}": (encoded(small, fmt), "ok") for fmt in imagecheck.ALLOWED_FORMATS},
        "good_progressive_jpeg": (progressive, "ok"),
        "good_png_of_max_bytes": (png + bytes(max_bytes - len(png)), "ok"),
    }


def api_verdict(data: bytes, settings: Settings) -> str:
    try:
        validate_uploads([("file", data)], settings)
    except DomainError as exc:
        return exc.code
    return "ok"


def worker_verdict(data: bytes, settings: Settings) -> str:
    try:
        load_input_image(data, settings)
    except ImageError as exc:
        return exc.code
    return "ok"


@pytest.fixture
def make_settings(settings_factory: MakeSettings, tmp_path: Path) -> MakeSettings:
    return lambda **limits: settings_factory(data_dir=tmp_path / "data", **limits)


def test_the_checks_share_their_constants() -> None:
    assert engine_images.ALLOWED_FORMATS == imagecheck.ALLOWED_FORMATS
    assert engine_images.MIN_SIDE == imagecheck.MIN_SIDE
    assert engine_images.MAX_JPEG_SCANS == imagecheck.MAX_JPEG_SCANS


def test_api_and_worker_give_every_file_the_same_code(make_settings: MakeSettings) -> None:
    settings = make_settings(max_upload_bytes=2_000_000)
    verdicts = {
        name: (expected, api_verdict(data, settings), worker_verdict(data, settings))
        for name, (data, expected) in corpus(settings.max_upload_bytes).items()
    }
    wrong = {name: v for name, v in verdicts.items() if len(set(v)) > 1}
    assert not wrong, "name: (expected, API, worker)\n" + "\n".join(f"{k}: {v}" for k, v in wrong.items())


def test_raised_limits_hold_for_the_worker_too(make_settings: MakeSettings) -> None:
    """Limits above the engine's defaults (40 MP, 50 MB): an image just under them passes the API and
    the worker (the engine's defaults alone would refuse it); just over, both refuse it."""
    pixels, max_bytes = 41_000_000, 60_000_000
    assert pixels > engine_images.DEFAULT_MAX_PIXELS and max_bytes > engine_images.DEFAULT_MAX_BYTES
    settings = make_settings(max_image_pixels=pixels, max_upload_bytes=max_bytes)
    many_pixels = encoded(Image.new("L", (6400, 6400), 128), "PNG")  # 40,960,000 pixels
    small = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    many_bytes = small + bytes(max_bytes - len(small))  # trailing bytes after IEND are ignored
    for data, engine_default in ((many_pixels, "too_many_pixels"), (many_bytes, "too_many_bytes")):
        with pytest.raises(ImageError) as exc:
            load_image(data)
        assert exc.value.code == engine_default
        assert (api_verdict(data, settings), worker_verdict(data, settings)) == ("ok", "ok")
    for data, code in ((png_header(6404, 6404), "too_many_pixels"), (many_bytes + b"\0", "too_many_bytes")):
        assert (api_verdict(data, settings), worker_verdict(data, settings)) == (code, code)
