"""Small test images: distinct PNG/JPEG bytes made on the fly, and the repository's example images."""

from __future__ import annotations

import io
import itertools
import random

from PIL import Image

from tests.support import REPO

EXAMPLES = REPO / "examples" / "images"

_colors = itertools.count(1)


def image_bytes(w: int = 64, h: int = 48, fmt: str = "PNG", color: int | None = None) -> bytes:
    """A distinct small image each call (unless ``color`` is given)."""
    c = next(_colors) if color is None else color
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), ((c * 53) % 256, (c * 97) % 256, (c // 256) % 256))
    img.putpixel((c % w, 0), (255, 255, 255))  # distinct bytes even after JPEG quantization
    img.save(buf, fmt)
    return buf.getvalue()


def png(color: tuple[int, int, int] = (0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(seed: int, w: int = 64, h: int = 48) -> bytes:
    """A small PNG whose bytes (so whose id, its sha256) differ for every seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(8):
        img.putpixel((rng.randrange(w), rng.randrange(h)), (rng.randrange(256),) * 3)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
