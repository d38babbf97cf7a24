"""Checks shared by TransferConfig and BatchItem: finite weights, blend weights, error type."""

from __future__ import annotations

import math
import numbers

from .errors import EngineError


def check_weight(name: str, value: float) -> None:
    """A loss weight must be a finite number >= 0 (NaN, inf and negatives make no picture)."""
    if not (finite(value) and value >= 0):
        raise invalid(f"{name} must be a finite number >= 0, not {value}")


def check_blend(weights: tuple[float, ...]) -> None:
    """Blend weights: finite, >= 0, with a positive finite sum (they are divided by it)."""
    if (
        not weights
        or not all(finite(w) and w >= 0 for w in weights)
        or not (
            0 < sum(float(w) for w in weights) < math.inf  # 1e308 + 1e308 is inf
        )
    ):
        raise invalid(
            f"style blend weights {list(weights)} must be finite non-negative numbers (one per style) "
            "with a positive sum"
        )


def normalise_blend(weights: tuple[float, ...] | None, n: int) -> list[float]:
    """Blend weights for n styles, normalised to sum 1 (None = equal)."""
    if weights is None:
        return [1.0 / n] * n
    check_blend(weights)
    if len(weights) != n:
        raise invalid(f"style blend weights {list(weights)} must be {n} numbers, one per style")
    total = sum(float(w) for w in weights)
    return [float(w) / total for w in weights]


def finite(value: object) -> bool:
    """A real number (not bool) that is neither NaN nor infinite (nor an int too big for a float)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def invalid(message: str) -> EngineError:
    return EngineError("invalid_config", message)
