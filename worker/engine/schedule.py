"""The coarse-to-fine schedule as plain data: a list of ((height, width), iterations).

Pure functions (no torch), so the API can mirror them: shared/params.py does, and
tests/engine/test_params_mirror.py checks that the two agree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from .errors import EngineError

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
# Adam's own auto schedule: crowsonkb/style-transfer-pytorch's 1000 iterations at the first scale and
# 500 at each later one (3000 over the default pyramid). Adam at lr 0.02 moves a pixel by at most ~lr
# per step, so it needs several times L-BFGS's 815; its output is the average of the iterates (EMA).
# Departure: scales above ADAM_EDGE px get 500 * ADAM_EDGE / edge (a 2048 job: 354, 250, 177, 125 at
# 724-2048), so a large Adam job costs ~3x its 512 one, not ~16x, and stays inside the service's work
# limit; the large scales only refine, as with L-BFGS.
ADAM_FIRST, ADAM_LATER, ADAM_EDGE = 1000, 500, 512

MIN_SCALE_FACTOR = 1.1  # below this a job is many near-identical scales (each a full VGG pass + checkpoint)
MAX_SCALE_FACTOR = 4.0  # above this a scale starts from a 16x smaller image: coarse-to-fine stops helping
MAX_SCALES = 16  # default limit on the number of scales (TransferConfig.max_scales)
# VGG19 up to relu5_1 has 4 max pools (each halves a side, floor): a side under 2**4 px reaches a
# pool with nothing to pool and torch fails ("Output size is too small"). Same as images.MIN_SIDE.
MIN_SIDE = 16

Schedule = list[tuple[tuple[int, int], int]]


def auto_iterations(long_edge: int) -> int:
    """Iterations the auto schedule gives a scale whose long edge is ``long_edge``."""
    n = round(AUTO_BASE_ITERATIONS * (AUTO_BASE_EDGE / long_edge) ** AUTO_EXPONENT)
    return int(max(AUTO_MIN, min(AUTO_MAX, n)))


def auto_counts(edges: Sequence[int], optimizer: str = "lbfgs") -> list[int]:
    """The auto schedule's iterations for each scale of a pyramid, per optimiser."""
    if optimizer == "adam":
        return [
            ADAM_FIRST if i == 0 else round(ADAM_LATER * min(1.0, ADAM_EDGE / e)) for i, e in enumerate(edges)
        ]
    return [auto_iterations(e) for e in edges]


def long_edges(size: int, min_size: int, scale_factor: float, max_scales: int = MAX_SCALES) -> list[int]:
    """Long edges from ``min_size`` up to ``size``, multiplying by ``scale_factor``; ends at ``size``.

    The number of scales is known in closed form before the loop, so a factor near 1 is refused at
    once (EngineError ``too_many_scales``) instead of looping ~1e16 times; a factor outside
    [MIN_SCALE_FACTOR, MAX_SCALE_FACTOR] (NaN included) is ``invalid_config``.
    """
    if min_size >= size:
        return [size]
    if not MIN_SCALE_FACTOR <= scale_factor <= MAX_SCALE_FACTOR:
        raise EngineError(
            "invalid_config",
            f"scale_factor must be between {MIN_SCALE_FACTOR} and {MAX_SCALE_FACTOR}, not {scale_factor}",
        )
    target = size * (1 - 1e-6)
    # closed form: edge k is min_size * f**k; the loop below appends those under target
    steps = math.ceil(math.log(target / min_size) / math.log(scale_factor))
    if steps > max_scales:
        raise _too_many_scales(steps + 1, size, min_size, scale_factor, max_scales)
    edges: list[int] = []
    edge = float(min_size)
    for _ in range(steps + 2):  # bounded; float rounding may need one step more than the closed form
        if edge >= target:
            break
        edges.append(round(edge))
        edge *= scale_factor
    # Departure from crowsonkb's rule: drop a last step to the target shorter than sqrt(factor)
    # (768 would otherwise go 724 -> 768, a whole scale of work for a 6 % change).
    if edges and size / edges[-1] < scale_factor**0.5:
        edges.pop()
    edges.append(size)
    if len(edges) > max_scales:
        raise _too_many_scales(len(edges), size, min_size, scale_factor, max_scales)
    return edges


def _too_many_scales(count: int, size: int, min_size: int, factor: float, limit: int) -> EngineError:
    return EngineError(
        "too_many_scales",
        f"about {count} scales from {min_size} to {size} px at scale_factor {factor:g}; the maximum "
        f"is {limit}: raise scale_factor or min_size",
    )


def fit_long_edge(hw: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(h, w) with the same aspect ratio as ``hw`` and the given long edge."""
    h, w = hw
    if w >= h:
        return max(1, round(h * long_edge / w)), long_edge
    return long_edge, max(1, round(w * long_edge / h))


def style_size(
    style_hw: tuple[int, int], content_hw: tuple[int, int], style_scale: float, *, upscale: bool = True
) -> tuple[int, int]:
    """(h, w) a style is resized to at a scale whose content is ``content_hw`` (jcjohnson's rule:
    the style's long edge is ``style_scale`` x the content's long edge); with ``upscale`` False
    that long edge is capped at the style's own (TransferConfig.style_upscale)."""
    edge = max(1, round(style_scale * max(content_hw)))
    if not upscale and edge >= max(style_hw):
        return style_hw  # native size: both sides >= MIN_SIDE by the upload rules
    return fit_long_edge(style_hw, edge)


def check_runnable(
    sizes: Sequence[tuple[int, int]],
    style_hws: Sequence[tuple[int, int]] = (),
    style_scale: float = 1.0,
    *,
    upscale: bool = True,
) -> None:
    """Refuse (EngineError ``image_too_narrow``) a schedule VGG19 cannot run. The exact rule:

    ``sizes`` are the content's fitted (h, w) at each scale, ``fit_long_edge(content_hw, edge)``:
    the long side becomes ``edge`` and the short side ``max(1, round(short * edge / long))``
    (Python's round, half to even). For each scale in schedule order, refuse if ``min(h, w) < 16``
    (MIN_SIDE); then fit each style (h_s, w_s) the same way to the long edge
    ``max(1, round(style_scale * max(h, w)))`` (``style_size``) and refuse if a side is < 16.
    The first failure is reported (content before styles at a scale, styles in order).
    With ``upscale`` False a style whose fitted long edge would exceed its own stays at its native
    size instead, never narrower than under the rule above (an upscaled style is not narrower than
    its native size either, whose sides are >= 16 px by the upload rules): the verdict is the same,
    so the API's mirror (shared/params.py, which assumes the uncapped rule) still agrees.
    """
    for i, hw in enumerate(sizes, start=1):
        if min(hw) < MIN_SIDE:
            raise _too_narrow("the content image", i, hw, hw, "or a larger min_size (or scales)")
        for k, st in enumerate(style_hws, start=1):
            shw = style_size(st, hw, style_scale, upscale=upscale)
            if min(shw) < MIN_SIDE:
                raise _too_narrow(f"style image {k}", i, hw, shw, "or a larger style_scale")


def _too_narrow(
    what: str, scale: int, content_hw: tuple[int, int], hw: tuple[int, int], fix: str
) -> EngineError:
    return EngineError(
        "image_too_narrow",
        f"{what} becomes {hw[1]}x{hw[0]} px at scale {scale} (long edge {max(content_hw)} px); "
        f"VGG19 needs both sides of at least {MIN_SIDE} px: use a less elongated image {fix}",
    )


def build_schedule(
    content_hw: tuple[int, int],
    *,
    size: int = 512,
    min_size: int = 128,
    scale_factor: float = 2**0.5,
    scales: tuple[int, ...] | None = None,
    iterations: int | tuple[int, ...] | None = None,
    max_scales: int = MAX_SCALES,
    optimizer: str = "lbfgs",
) -> Schedule:
    """Pure function: the ((h, w), iterations) of each scale, smallest first.

    ``scales`` (explicit long edges) overrides size/min_size/scale_factor. ``iterations``: None is
    the optimiser's auto schedule (auto_counts), an int is the same at every scale, a tuple gives
    one count per scale.
    Refuses more than ``max_scales`` scales (``too_many_scales``) and a content image that would have
    a side under 16 px at some scale (``image_too_narrow``, see check_runnable).
    """
    if scales and len(scales) > max_scales:
        raise EngineError(
            "too_many_scales",
            f"{len(scales)} scales given; the maximum is {max_scales}: give fewer scales",
        )
    edges = list(scales) if scales else long_edges(size, min_size, scale_factor, max_scales)
    if isinstance(iterations, int):
        counts = [iterations] * len(edges)
    elif iterations is None:
        counts = auto_counts(edges, optimizer)
    else:
        counts = list(iterations)
        if len(counts) != len(edges):
            raise EngineError(
                "invalid_config",
                f"{len(counts)} iteration counts given for {len(edges)} scales {edges}; "
                "give one count per scale or a single count",
            )
    sizes = [fit_long_edge(content_hw, e) for e in edges]
    check_runnable(sizes)
    return list(zip(sizes, counts, strict=True))
