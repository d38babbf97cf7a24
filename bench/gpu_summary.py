"""bench/gpu.py's default-job section and summary: a default 512 job end to end, default jobs per hour
estimated from the s/it figures, batch speed-ups, and the issue's targets (MISSED where one is not met)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpu_common import Case, Measured, Plan, peak_gib, reset_memory, say, sync, synth_image

from worker.engine import BatchItem, StyleTransfer, TransferConfig
from worker.engine.groups import GroupJob, run_group
from worker.engine.schedule import Schedule, build_schedule

TARGET_JOB_S = 1.5  # a default 512 job at B = 1, seconds
TARGET_JOBS_PER_HOUR = 3000.0  # default 512 jobs per hour at the best B
TARGET_SPEEDUP = 10.0  # images/s at B = 16 over B = 1, at 512
TARGET_BATCH = 16

# ------------------------------------------------------------------------------------ default job


def default_job(engine: StyleTransfer, plan: Plan) -> float | None:
    """A default 512 job (default schedule, L-BFGS, default precision) at B = 1, end to end:
    run_group cold then warm, and engine.run (the worker's single-job path) warm. CUDA only."""
    if not plan.cuda():
        say("default job end to end: not measured (--quick: CUDA only)")
        return None
    cfg = TransferConfig(weights="random", device=plan.device)
    sched = build_schedule((512, 512), optimizer=cfg.optimizer)
    say(
        f"\n# default 512 job, B = 1: {' '.join(f'{hw[0]}:{n}' for hw, n in sched)} (px:iterations), "
        f"{cfg.optimizer}, precision {cfg.precision} = {plan.default_precision()}"
    )
    content, style = synth_image(512, 0), synth_image(512, 10_000)
    runs: list[tuple[str, Callable[[], Any]]] = [
        (
            "run_group B=1 cold (first run: cudnn autotuning of new shapes)",
            lambda: run_group(engine, [GroupJob(BatchItem(content, [style]))], cfg),
        ),
        ("run_group B=1 warm", lambda: run_group(engine, [GroupJob(BatchItem(content, [style]))], cfg)),
        ("engine.run (single-job path) warm", lambda: engine.run(content, [style], cfg)),
    ]
    warm: float | None = None
    for name, fn in runs:
        try:
            reset_memory(plan)
            sync(plan)
            t0 = time.perf_counter()
            fn()
            sync(plan)
            seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a bench case fails alone; the run goes on
            say(f"default job {name}: error: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        say(f"default job {name}: {seconds:8.3f} s  peak {peak_gib(plan) or 0:.2f} GiB")
        if name == "run_group B=1 warm":
            warm = seconds
    return warm


# ---------------------------------------------------------------------------------------- summary


def interpolate(points: dict[int, float], pixels: float) -> float:
    """s/it at a pixel count: linear between measured sizes' pixel counts, by pixel ratio beyond."""
    xs = sorted(points)
    if pixels <= xs[0] ** 2:
        return points[xs[0]]
    if pixels >= xs[-1] ** 2:
        return points[xs[-1]] * pixels / xs[-1] ** 2
    for lo, hi in zip(xs, xs[1:], strict=False):
        if lo**2 <= pixels <= hi**2:
            f = (pixels - lo**2) / (hi**2 - lo**2)
            return points[lo] + f * (points[hi] - points[lo])
    raise AssertionError("unreachable")


def job_schedule(plan: Plan, optimizer: str) -> Schedule:
    """The default job's schedule (size 512, min_size 128 in the full grid; --quick: its sizes)."""
    cfg = TransferConfig(size=max(plan.sizes), min_size=min(plan.sizes), optimizer=optimizer)
    return build_schedule((cfg.size, cfg.size), size=cfg.size, min_size=cfg.min_size, optimizer=optimizer)


def job_seconds(done: dict[Case, Measured], plan: Plan, opt: str, prec: str, b: int) -> float | None:
    """Seconds per default job at batch B: sum over scales of iterations x s/it(scale) / B."""
    points = {c.size: m.spi for c, m in done.items() if (c.optimizer, c.precision, c.batch) == (opt, prec, b)}
    if set(points) != set(plan.sizes):
        return None
    return sum(n * interpolate(points, h * w) for (h, w), n in job_schedule(plan, opt)) / b


def jobs_per_hour(done: dict[Case, Measured], plan: Plan) -> dict[tuple[str, str, int], float]:
    say(
        "\n# default jobs per hour, estimated: sum over scales of iterations x s/it (by pixels) / B; "
        "one-time costs not included"
    )
    for opt in plan.optimizers:
        sched = job_schedule(plan, opt)
        say(f"schedule {opt}: {' '.join(f'{hw[0]}:{n}' for hw, n in sched)} (px:iterations)")
    rates: dict[tuple[str, str, int], float] = {}
    for opt in plan.optimizers:
        for prec in plan.precisions:
            for b in plan.batches:
                s = job_seconds(done, plan, opt, prec, b)
                if s is None:
                    say(f"jobs/hour {opt:<5} {prec:<4} B={b:<3} not measured at every size")
                    continue
                rates[(opt, prec, b)] = 3600.0 / s
                say(f"jobs/hour {opt:<5} {prec:<4} B={b:<3} {s:9.3f} s/job {3600.0 / s:10.0f} jobs/h")
    return rates


def verdict(plan: Plan, ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    if plan.quick:
        return "n/a in --quick (cpu)"
    return "met" if ok else "MISSED"


def speedups(done: dict[Case, Measured], plan: Plan) -> dict[tuple[str, str], float]:
    """images/s at each B over B = 1, at the largest size."""
    top, out = max(plan.sizes), {}
    for opt in plan.optimizers:
        for prec in plan.precisions:
            one = done.get(Case(opt, prec, top, 1))
            for b in plan.batches:
                m = done.get(Case(opt, prec, top, b))
                if b == 1 or one is None or m is None:
                    continue
                ratio = one.spi * b / m.spi
                if b == TARGET_BATCH:
                    out[(opt, prec)] = ratio
                say(f"speed-up {opt:<5} {prec:<4} {top}px B={b:<3} vs B=1: {ratio:6.2f}x images/s")
    return out


def target_job(plan: Plan, warm_job: float | None) -> bool | None:
    ok = None if warm_job is None else warm_job <= TARGET_JOB_S
    say(
        f"target default 512 job at B=1 <= {TARGET_JOB_S} s: {verdict(plan, ok)}"
        + (f" ({warm_job:.3f} s, run_group warm)" if warm_job is not None else "")
    )
    return ok


def target_rate(plan: Plan, rates: dict[tuple[str, str, int], float]) -> bool | None:
    """Default jobs (L-BFGS, default precision) per hour at the best measured B."""
    mine = {k: v for k, v in rates.items() if k[:2] == ("lbfgs", plan.default_precision())}
    best = max(mine.items(), key=lambda kv: kv[1]) if mine else None
    ok = None if best is None else best[1] >= TARGET_JOBS_PER_HOUR
    say(
        f"target >= {TARGET_JOBS_PER_HOUR:.0f} default jobs/hour at the best B: {verdict(plan, ok)}"
        + (f" ({best[1]:.0f} jobs/h at B={best[0][2]}, lbfgs {best[0][1]})" if best else "")
    )
    return ok


def target_speedups(plan: Plan, ups: dict[tuple[str, str], float]) -> list[bool | None]:
    oks: list[bool | None] = []
    for opt, prec in (("adam", "bf16"), ("lbfgs", plan.default_precision())):
        r = ups.get((opt, prec))
        oks.append(None if r is None else r >= TARGET_SPEEDUP)
        say(
            f"target B={TARGET_BATCH} >= {TARGET_SPEEDUP:.0f}x the images/s of B=1 at {max(plan.sizes)} px, "
            f"{opt} {prec}: {verdict(plan, oks[-1])}" + (f" ({r:.2f}x)" if r is not None else "")
        )
    return oks


def summary(done: dict[Case, Measured], plan: Plan, warm_job: float | None) -> bool:
    """Jobs per hour, batch speed-ups and the targets; False when one is MISSED."""
    rates = jobs_per_hour(done, plan)
    say(f"\n# batch speed-up: images/s at B over B=1, at {max(plan.sizes)} px")
    ups = speedups(done, plan)
    say("\n# targets (the issue's)")
    est1 = (
        job_seconds(done, plan, "lbfgs", plan.default_precision(), 1) if "lbfgs" in plan.optimizers else None
    )
    if warm_job is not None and est1 is not None:
        say(
            f"default job B=1: measured {warm_job:.3f} s vs estimated {est1:.3f} s from s/it "
            "(the difference: one-time costs per scale and host reads; L-BFGS steps before its history "
            "fills cost less than the s/it measured)"
        )
    oks = [target_job(plan, warm_job), target_rate(plan, rates), *target_speedups(plan, ups)]
    return not any(ok is False for ok in oks)
