"""Checkpoint: everything needed to resume a job, serialisable with torch.save (weights_only-safe)."""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .errors import EngineError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """State after ``iteration`` iterations of scale ``scale`` (``step`` iterations in all).

    ``optimizer_state`` is the optimiser's state_dict (Adam: moments and step; L-BFGS: its history,
    or None when that is over 64 MB, in which case a resumed L-BFGS restarts its history and the
    result is no longer bit-identical to an uninterrupted run).
    """

    scale: int
    iteration: int
    step: int
    image: torch.Tensor  # (B, 3, H, W) fp32 cpu in [0, 1], RGB as it would be delivered
    optimizer_state: dict[str, Any] | None
    config_digest: str
    end_of_scale: bool
    lr: float = 0.0  # current step size (NaN recoveries halve it)
    recoveries: int = 0
    # per item (content, style, tv) weighted at the scale's first evaluation: the divisor of the
    # objective (losses.LossFn), so a mid-scale resume minimises the same function
    loss_start: list[list[float]] | None = None
    loss_scaler: dict[str, Any] | None = None  # fp16 only: scaler.LossScaler's scale and count
    # color="luminance": the optimised (B, 1, H, W) luminance; ``image`` is then the delivered look
    # (this Y with the content's chroma), so a preview made from it matches the result
    luminance: torch.Tensor | None = None
    # Adam with an EMA (config.ema_decay): ``image``/``luminance`` show the average (what the scale
    # delivers); ``iterate`` is the optimiser's own x and ``average`` the EMA's state, for a resume
    iterate: torch.Tensor | None = None
    average: dict[str, Any] | None = None
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(asdict(self), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(
                "checkpoint_invalid",
                f"not a stylequeue checkpoint ({first})",
            ) from e
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, dict) or not {"scale", "image", "config_digest"} <= set(obj):
            raise EngineError("checkpoint_invalid", "not a stylequeue checkpoint")
        if obj.get("version") != FORMAT_VERSION:
            raise EngineError(
                "checkpoint_invalid",
                f"checkpoint format {obj.get('version')} is not supported (expected {FORMAT_VERSION})",
            )
        return cls(**{k: v for k, v in obj.items() if k in names})
