"""Upload validation without torch: is it an image we accept, how big is it, is it whole?

Order matters: the byte count first, then the header (format from an explicit allow-list,
dimensions) BEFORE any pixel is decoded, then one full decode to catch truncated files. Pillow's own
decompression-bomb warning is turned into an error, and our pixel limit is lower than Pillow's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TypedDict

from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidInput, PayloadTooLarge
from shared.settings import Settings
from shared.storage_keys import FORMAT_MEDIA_TYPES

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
MIN_SIDE = 16


class ImageLimits(TypedDict):
    """The per-image limits, as keywords of ``read_header``/``inspect_image`` and of the engine's
    ``load_image``."""

    max_bytes: int
    max_pixels: int


def image_limits(settings: Settings) -> ImageLimits:
    """The service's per-image limits (``STYLEQUEUE_MAX_UPLOAD_BYTES``, ``_MAX_IMAGE_PIXELS``): the
    API inspects uploads with them and the worker decodes inputs with them, so an image the API
    accepted is one every worker can load."""
    return {"max_bytes": settings.max_upload_bytes, "max_pixels": settings.max_image_pixels}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # one of ALLOWED_FORMATS
    width: int
    height: int
    scans: int = 1  # JPEG start-of-scan markers (a progressive JPEG decodes each over the image)

    @property
    def decode_cost(self) -> float:
        """Pixels, times the passes a progressive JPEG makes beyond a usual ~10 scans."""
        return self.width * self.height * max(1.0, self.scans / 10)

    @property
    def content_type(self) -> str:
        return FORMAT_MEDIA_TYPES[self.format]


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


def _open_header(data: bytes) -> Image.Image:
    """Open (header only) with the allow-list; map failures to not_an_image / unsupported_format."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        pass
    try:  # Is it an image Pillow knows but we do not accept?
        other = Image.open(io.BytesIO(data))
        fmt = other.format or "unknown"
        other.close()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInput(
            "not_an_image",
            "the file is not a readable image; upload a PNG, JPEG, WEBP, BMP, TIFF or GIF file",
        ) from None
    raise InvalidInput(
        "unsupported_format",
        f"{fmt} images are not accepted; convert to PNG, JPEG, WEBP, BMP, TIFF or GIF",
    )


def read_header(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Format and dimensions from the header alone (cheap: no pixel is decoded); raise
    ``InvalidInput`` (``PayloadTooLarge`` for size) if unfit."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            "too_many_bytes",
            f"the file is {_mb(len(data))}; the limit is {_mb(max_bytes)} per image",
        )
    if not data:
        raise InvalidInput("not_an_image", "the file is empty; upload an image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = _open_header(data)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise InvalidInput(
                "too_many_pixels",
                f"the image has more than {max_pixels:,} pixels; downscale it and upload again",
            ) from None
        except (OSError, ValueError, SyntaxError):
            raise InvalidInput(
                "truncated", "the image header is damaged or incomplete; upload the file again"
            ) from None
        with img:
            # Pillow's JPEG opener returns MPO (multi-picture) for phone photos with an MPF header:
            # still a JPEG here (its first picture is what is decoded), so it gets the scan check
            fmt = "JPEG" if img.format == "MPO" else str(img.format)
            scans = _jpeg_scans(data) if fmt == "JPEG" else 1
            w, h = img.width, img.height
            if _exif_orientation(img) in _TRANSPOSED:  # stored sideways: upright, as it is used
                w, h = h, w
            info = ImageInfo(format=fmt, width=w, height=h, scans=scans)
    _check_dimensions(info, max_pixels)
    return info


# EXIF orientations 5-8 store the picture rotated by 90 degrees (phone photos held upright): the engine
# applies the orientation (ImageOps.exif_transpose) before anything else, so the API reports and
# checks (aspect of masks, too-narrow scales) the upright width and height too.
_TRANSPOSED = frozenset({5, 6, 7, 8})


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 when absent or unreadable); read from the header only."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is not the image's problem: upright
        return 1
    return value if isinstance(value, int) else 1


# A progressive JPEG decodes each of its scans over the whole image: a small file repeating its last
# scan thousands of times decodes for minutes (a "scan bomb"). Encoders write about 10 scans (libjpeg's
# progressive script has 10); an embedded thumbnail adds its own. 0xFFDA cannot occur inside
# entropy-coded data (0xFF is stuffed there as 0xFF00), so counting the bytes counts start-of-scan
# markers, at C speed, before anything is decoded.
# Below the cap each scan still costs a pass: ImageInfo.decode_cost charges scans / 10 passes.
MAX_JPEG_SCANS = 32


def _jpeg_scans(data: bytes) -> int:
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidInput(
            "too_many_scans",
            f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted: re-encode it "
            "(a baseline JPEG or a PNG)",
        )
    return max(1, scans)


def check_decodes(data: bytes) -> None:
    """Decode every pixel once (the expensive step: run it off the event loop) to catch truncated
    or damaged files. Call after ``read_header`` accepted the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with _open_header(data) as img:
                img.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning):
            raise InvalidInput(
                "truncated",
                "the image could not be decoded completely; it may be truncated or damaged, "
                "upload the file again",
            ) from None


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Validate an upload: ``read_header`` then ``check_decodes``."""
    info = read_header(data, max_bytes=max_bytes, max_pixels=max_pixels)
    check_decodes(data)
    return info


def _check_dimensions(info: ImageInfo, max_pixels: int) -> None:
    if info.width * info.height > max_pixels:
        raise InvalidInput(
            "too_many_pixels",
            f"the image is {info.width}x{info.height} ({info.width * info.height:,} pixels); "
            f"the limit is {max_pixels:,} pixels, downscale it and upload again",
        )
    if info.width < MIN_SIDE or info.height < MIN_SIDE:
        raise InvalidInput(
            "too_small",
            f"the image is {info.width}x{info.height}; both sides must be at least {MIN_SIDE} px",
        )


__all__ = [
    "ALLOWED_FORMATS",
    "MAX_JPEG_SCANS",
    "MIN_SIDE",
    "ImageInfo",
    "ImageLimits",
    "check_decodes",
    "image_limits",
    "inspect_image",
    "read_header",
]
