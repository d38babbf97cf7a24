"""Upload validation without torch: is it an image we accept, how big is it, is it whole?

Order matters: the byte count first, then the header (format from an explicit allow-list,
dimensions) BEFORE any pixel is decoded, then one full decode to catch truncated files. Pillow's own
decompression-bomb warning is turned into an error, and our pixel limit is lower than Pillow's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
MIN_SIDE = 16

CONTENT_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}


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
        return CONTENT_TYPES[self.format]


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
            info = ImageInfo(format=fmt, width=img.width, height=img.height, scans=scans)
    _check_dimensions(info, max_pixels)
    return info


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


__all__ = ["ALLOWED_FORMATS", "CONTENT_TYPES", "ImageInfo", "check_decodes", "inspect_image",
           "read_header"]
