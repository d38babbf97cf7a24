"""The small thumbnails the page's grids show instead of full previews and results.

A checkpoint's is written next to its preview by the uploader thread (``worker.checkpoints``, never
the optimisation loop), a result's next to the result (``worker.settle``). Size, format and quality:
``shared.storage_keys`` (``THUMB_*``), where their keys are built.
"""

from __future__ import annotations

import io

from PIL import Image

from shared import storage_keys
from worker.engine.images import to_rgb


def thumbnail(image: Image.Image, max_edge: int | None = None) -> bytes:
    """``image`` as an RGB JPEG whose long edge is at most ``max_edge`` (``THUMB_MAX_EDGE``; a smaller
    image keeps its size); ``image`` itself is left as it is."""
    edge = storage_keys.THUMB_MAX_EDGE if max_edge is None else max_edge
    small = to_rgb(image).copy()
    small.thumbnail((edge, edge), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format=storage_keys.THUMB_FORMAT, quality=storage_keys.THUMB_QUALITY)
    return out.getvalue()


__all__ = ["thumbnail"]
