"""Errors raised by the engine: each has a short snake_case ``code`` and a message a user can act on.

Constructed as ``EngineError(code, message)``, the same order as the service's domain errors
(shared/errors.py), so a code is never mistaken for a message.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ImageError(EngineError):
    """A bad input image.

    Codes: not_an_image, truncated, too_small, too_many_pixels, too_many_bytes, unsupported_format,
    too_many_scans.
    """


class WeightsError(EngineError):
    """VGG19 weights that cannot be had (weights_unavailable) or are not valid (weights_invalid)."""


class GroupAborted(Exception):
    """Raised by a group member's callback to end the whole group, not that member alone (the
    caller's deadline, say): ``run_group`` raises it on. Any other exception a member's callback
    raises ends that member only. The reason is its ``__cause__`` (``raise GroupAborted() from exc``)."""
