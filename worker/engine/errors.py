"""Errors raised by the engine: each has a short snake_case ``code`` and a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""

    code: str = "engine_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ImageError(EngineError):
    """A bad input image.

    Codes: not_an_image, truncated, too_small, too_many_pixels, too_many_bytes, unsupported_format.
    """

    code = "not_an_image"


class WeightsError(EngineError):
    """VGG19 weights that cannot be had (weights_unavailable) or are not valid (weights_invalid)."""

    code = "weights_unavailable"
