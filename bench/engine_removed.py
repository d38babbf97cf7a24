"""(f) of bench/engine.py: the fraction of the total and of each loss term removed by the end of
every scale of the default job, with the default loss weights and with all three x1e-3.

Each scale minimises the weighted sum divided by its value at the scale's first evaluation, so
multiplying every weight by one factor should leave the run unchanged: the two columns should agree.
The weights are never written here: x1 is TransferConfig's default, x1e-3 is
TransferConfig().loss_weights("random") times FACTOR. The job runs in a child process (bench/engine.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

TERMS = ("loss", "content", "style", "tv")
LABELS = {"loss": "total", "content": "content", "style": "style", "tv": "tv"}
FACTOR = 1e-3  # every loss weight times this in the second run
XF = "x1e-3"  # its name in the table
MIN_REMOVED = 0.10  # "substantial": the total falls by at least 10 % at every scale, in both runs
# x1e-3 may differ from x1 by at most this (absolute) in a removed fraction. The objective is the same
# function up to rounding (x2**-10 gives bit-identical runs), but x1e-3 rounds differently, and over
# hundreds of iterations the trajectories drift apart a little; the TV term, ~1 % of the objective, is
# the most sensitive (its fraction moved up to 0.019 in the default 512 job, the total 0.0016).
MATCH = {"loss": 0.01, "content": 0.01, "style": 0.01, "tv": 0.05}


def case_removed(
    content: str,
    style: str,
    size: int,
    min_size: int | None,
    iterations: int | list[int] | None,
    factor: float,
) -> dict[str, Any]:
    """One default job (random weights, seeded) with every loss weight times ``factor``: per scale
    the removed fractions from Result.metadata["loss_removed"] and from the scale's last Progress."""
    from worker.engine import Progress, StyleTransfer, TransferConfig

    cfg = TransferConfig(
        size=size,
        weights="random",
        device="cpu",
        iterations=tuple(iterations) if isinstance(iterations, list) else iterations,
    )
    if min_size is not None:
        cfg = dataclasses.replace(cfg, min_size=min_size)
    if factor != 1.0:
        w = cfg.loss_weights("random")  # the defaults (TransferConfig().loss_weights): only size etc. set
        cfg = dataclasses.replace(
            cfg, content_weight=w.content * factor, style_weight=w.style * factor, tv_weight=w.tv * factor
        )
    last: dict[int, Progress] = {}
    t0 = time.perf_counter()
    r = StyleTransfer(weights="random", device="cpu").run(
        content, [style], cfg, on_progress=lambda p: last.__setitem__(p.scale, p)
    )
    return {
        "seconds": time.perf_counter() - t0,
        "weights": r.metadata["loss_weights"][0],
        "scales": r.metadata["scales"],
        "iterations": r.metadata["iterations"],
        "removed": [d or dict.fromkeys(TERMS) for d in r.metadata["loss_removed"]],
        "progress": [
            {t: getattr(last[s], f"{t}_removed") for t in TERMS} if s in last else None
            for s in range(len(r.metadata["scales"]))
        ],
    }


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or a == 0 else f"{b / a:.4f}"


def _weights(w: list[float]) -> str:
    return f"content {w[0]:g}, style {w[1]:g}, tv {w[2]:g}"


def print_table(one: dict[str, Any], small: dict[str, Any]) -> None:
    """One row per scale and term: removed by the end of the scale at x1 and x1e-3, and x1e-3 / x1."""
    print(f"    x1:    {_weights(one['weights'])}  ({one['seconds']:.1f} s)")
    print(f"    {XF}: {_weights(small['weights'])}  ({small['seconds']:.1f} s)")
    print(f"{'scale':>5} {'size':>9} {'its':>5}  {'term':<8} {'x1':>10} {XF:>10} {'ratio':>8}")
    for s, (hw, its) in enumerate(zip(one["scales"], one["iterations"], strict=True)):
        for i, t in enumerate(TERMS):
            a, b = one["removed"][s][t], small["removed"][s][t]
            head = f"{s:>5} {f'{hw[0]}x{hw[1]}':>9} {its:>5}" if i == 0 else " " * 21
            print(f"{head}  {LABELS[t]:<8} {_pct(a):>10} {_pct(b):>10} {_ratio(a, b):>8}")


def verdicts(one: dict[str, Any], small: dict[str, Any]) -> bool:
    """Print the three checks; False when one fails."""
    totals = [
        (r["removed"][s]["loss"], s, name)
        for name, r in (("x1", one), (XF, small))
        for s in range(len(r["removed"]))
    ]
    low = min(totals, key=lambda v: float("-inf") if v[0] is None else v[0])
    substantial = low[0] is not None and low[0] >= MIN_REMOVED
    print(
        f"  substantial at every scale (total removed >= {100 * MIN_REMOVED:.0f} % at each, both runs): "
        f"{'yes' if substantial else 'NO'} (lowest {_pct(low[0])}, scale {low[1]} {low[2]})"
    )
    diffs = [
        (_diff(one["removed"][s][t], small["removed"][s][t]) / MATCH[t], s, t)
        for s in range(len(one["removed"]))
        for t in TERMS
    ]
    worst = max(diffs, key=lambda v: v[0])
    match = worst[0] <= 1 and one["scales"] == small["scales"]
    limits = ", ".join(f"{LABELS[t]} {MATCH[t]}" for t in TERMS)
    print(
        f"  {XF} matches x1 (|difference| of each removed fraction at every scale within {limits}): "
        f"{'yes' if match else 'NO'} (largest {worst[0] * MATCH[worst[2]]:.2g}, "
        f"{LABELS[worst[2]]} at scale {worst[1]})"
    )
    agree = all(r["progress"] == r["removed"] for r in (one, small))
    print(
        f"  Progress.*_removed at each scale's last iteration == metadata['loss_removed']: "
        f"{'yes' if agree else 'NO'}"
    )
    return substantial and match and agree


def _diff(a: float | None, b: float | None) -> float:
    """|a - b|; 0 when both are None (a term off or starting at 0 in both), inf when only one is."""
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return abs(a - b)


def report(one: dict[str, Any], small: dict[str, Any], size: int) -> bool:
    """(f): the table and the verdicts for the two runs; False when a check fails."""
    print(
        f"\n(f) fraction of each loss term removed by the end of each scale, job to {size} "
        f"(x1 = default weights, {XF} = all three weights {XF}; — = term off or 0 at start)"
    )
    print_table(one, small)
    return verdicts(one, small)
