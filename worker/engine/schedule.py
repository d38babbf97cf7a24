"""The coarse-to-fine schedule as plain data: a list of ((height, width), iterations)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Auto schedule: iterations = 60 * (512 / long_edge) ** 1.2, clamped to [20, 400].
# Over the default 128/181/256/362/512 pyramid that is 317/209/138/91/60 iterations: most of the
# work happens where an iteration is cheap (an iteration costs ~pixels, 16x more at 512 than at 128)
# and the large scales only refine. Measured on the 2-core CPU it keeps the default 512 job well
# under 10 minutes (see bench/engine.py). crowsonkb/style-transfer-pytorch uses 1000 then 500 per
# scale with Adam, which takes about an hour on the same CPU; L-BFGS needs far fewer iterations.
AUTO_BASE_ITERATIONS = 60
AUTO_BASE_EDGE = 512
AUTO_EXPONENT = 1.2
AUTO_MIN, AUTO_MAX = 20, 400

Schedule = list[tuple[tuple[int, int], int]]


def auto_iterations(long_edge: int) -> int:
    """Iterations the auto schedule gives a scale whose long edge is ``long_edge``."""
    n = round(AUTO_BASE_ITERATIONS * (AUTO_BASE_EDGE / long_edge) ** AUTO_EXPONENT)
    return max(AUTO_MIN, min(AUTO_MAX, n))


def long_edges(size: int, min_size: int, scale_factor: float) -> list[int]:
    """Long edges from ``min_size`` up to ``size``, multiplying by ``scale_factor``; ends at ``size``."""
    if min_size >= size:
        return [size]
    edges: list[int] = []
    edge = float(min_size)
    while edge < size * (1 - 1e-6):
        edges.append(round(edge))
        edge *= scale_factor
    # Departure from crowsonkb's rule: drop a last step to the target shorter than sqrt(factor)
    # (768 would otherwise go 724 -> 768, a whole scale of work for a 6 % change).
    if edges and size / edges[-1] < scale_factor**0.5:
        edges.pop()
    edges.append(size)
    return edges


def fit_long_edge(hw: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(h, w) with the same aspect ratio as ``hw`` and the given long edge."""
    h, w = hw
    if w >= h:
        return max(1, round(h * long_edge / w)), long_edge
    return long_edge, max(1, round(w * long_edge / h))


def build_schedule(
    content_hw: tuple[int, int],
    *,
    size: int = 512,
    min_size: int = 128,
    scale_factor: float = 2**0.5,
    scales: tuple[int, ...] | None = None,
    iterations: int | tuple[int, ...] | None = None,
) -> Schedule:
    """Pure function: the ((h, w), iterations) of each scale, smallest first.

    ``scales`` (explicit long edges) overrides size/min_size/scale_factor. ``iterations``: None is
    the auto schedule, an int is the same at every scale, a tuple gives one count per scale.
    """
    edges = list(scales) if scales else long_edges(size, min_size, scale_factor)
    if isinstance(iterations, int):
        counts = [iterations] * len(edges)
    elif iterations is None:
        counts = [auto_iterations(e) for e in edges]
    else:
        counts = list(iterations)
        if len(counts) != len(edges):
            from .errors import EngineError

            raise EngineError(
                f"{len(counts)} iteration counts given for {len(edges)} scales {edges}; "
                "give one count per scale or a single count",
                code="invalid_config",
            )
    return [(fit_long_edge(content_hw, e), n) for e, n in zip(edges, counts, strict=True)]
