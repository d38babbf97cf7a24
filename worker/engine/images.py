"""Loading, validating, converting and saving images; PIL <-> tensor helpers."""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import ImageError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
MIN_SIDE = 16
DEFAULT_MAX_BYTES = 50_000_000  # 50 MB of encoded file
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP, below Pillow's own 89.5 MP decompression-bomb limit
# A progressive JPEG decodes each scan over the whole image; more scans than encoders write (about 10)
# make a small file decode for minutes. The service's upload check refuses the same (shared.imagecheck).
MAX_JPEG_SCANS = 32
_SAVE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

Source = str | os.PathLike[str] | bytes | bytearray | Image.Image


def load_image(
    source: Source,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image from a path or bytes as an 8-bit RGB PIL image.

    The header (format, size, a JPEG's scan count) is checked before decoding, with the same codes
    as the service's upload check (shared.imagecheck); EXIF orientation is applied; an embedded ICC profile
    is converted to sRGB; L/LA/RGBA/P/CMYK/I;16 images become RGB (transparency composited on white).
    Every failure raises ImageError with a code.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name, data = _read(source, max_bytes)
    im = _open(name, data, max_pixels)
    try:
        im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(
            "truncated",
            f"{name} is truncated or corrupt ({e}); upload the complete file",
        ) from e
    im = ImageOps.exif_transpose(im) or im
    return to_rgb(_to_srgb(im))


def _read(source: Any, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray)):
        name, size = "the image", len(source)
    else:
        name = f"'{os.fspath(source)}'"
        try:
            size = os.path.getsize(source)
        except OSError as e:
            raise ImageError("not_an_image", f"cannot read {name}: {e.strerror or e}") from e
    if size > max_bytes:
        raise ImageError(
            "too_many_bytes",
            f"{name} is {size:,} bytes; images must be at most {max_bytes:,} bytes",
        )
    if isinstance(source, (bytes, bytearray)):
        return name, bytes(source)
    return name, Path(source).read_bytes()


def _open(name: str, data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            "too_many_pixels",
            f"{name} is too large to decode safely ({e}); images must have at most {max_pixels:,} pixels",
        ) from e
    except UnidentifiedImageError as e:
        raise _unidentified(name, data) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # a known format, its header cut short
        raise ImageError(
            "truncated", f"{name} has a damaged or incomplete header ({e}); upload the complete file"
        ) from e
    except Exception as e:  # PIL raises others on garbage input
        raise _unidentified(name, data) from e
    _check_scans(name, data, str(im.format))
    w, h = im.size  # from the header: nothing decoded yet
    if w * h > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"{name} is {w}×{h} pixels ({w * h:,}); images must have at most {max_pixels:,} pixels",
        )
    if min(w, h) < MIN_SIDE:
        raise ImageError(
            "too_small",
            f"{name} is {w}×{h} pixels; images must be at least {MIN_SIDE}×{MIN_SIDE}",
        )
    return im


def _check_scans(name: str, data: bytes, fmt: str) -> None:
    """At most MAX_JPEG_SCANS start-of-scan markers (0xFFDA, which cannot occur inside entropy-coded
    data) in a JPEG (MPO: a JPEG with a multi-picture header), counted before anything is decoded."""
    scans = data.count(b"\xff\xda") if fmt in ("JPEG", "MPO") else 0
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            "too_many_scans",
            f"{name} is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are accepted: re-encode "
            "it (a baseline JPEG or a PNG)",
        )


def _unidentified(name: str, data: bytes) -> ImageError:
    """Say whether the data is a format we refuse, or not an image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - only naming the format for the message; unknown is fine
        fmt = None
    if fmt:
        return ImageError(
            "unsupported_format",
            f"{name} is a {fmt} image; supported formats are {', '.join(ALLOWED_FORMATS)}",
        )
    return ImageError(
        "not_an_image",
        f"{name} is not an image (or is damaged); supported formats are {', '.join(ALLOWED_FORMATS)}",
    )


def _to_srgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if im.mode == "RGBA" else "RGB"
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=mode)
        return out if out is not None else im
    except Exception as e:  # noqa: BLE001 - a broken profile should not fail the job
        logger.warning("ignoring an ICC profile that could not be applied: %s", e)
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 255:  # 16-bit range
            arr = arr / 257.0
        im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def save_image(
    img: Image.Image,
    dest: str | os.PathLike[str] | IO[bytes],
    format: str | None = None,
    quality: int = 95,
) -> None:
    """Write PNG, JPEG or WebP; the format comes from ``format`` or else the file suffix."""
    fmt = (format or "").lower().lstrip(".")
    if not fmt:
        is_path = isinstance(dest, (str, os.PathLike))
        fmt = Path(os.fspath(dest)).suffix.lower().lstrip(".") if is_path else "png"  # type: ignore[arg-type]
    if fmt not in _SAVE_FORMATS:
        raise ImageError(
            "unsupported_format",
            f"cannot write {fmt or 'files without a suffix'!r}; use .png, .jpg or .webp",
        )
    kind = _SAVE_FORMATS[fmt]
    opts: dict[str, Any] = {"quality": quality} if kind in ("JPEG", "WEBP") else {}
    to_rgb(img).save(dest, format=kind, **opts)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    arr = np.asarray(to_rgb(im), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> RGB PIL image (rounded to 8 bits)."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])[:3]
    arr = x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): bicubic (antialiased when shrinking), clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x.clone()
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    out = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp_(0, 1)
