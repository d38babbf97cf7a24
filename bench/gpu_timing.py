"""bench/gpu.py's measurements of the eager engine: seconds per iteration of one case (the timed
window between two synchronised reads), the two-run check, host syncs per iteration, and the grid of
cases under the time budget."""

from __future__ import annotations

import time
import warnings

import torch
from gpu_common import (
    GFLOP_512,
    NO_READS,
    PEAK_TFLOPS,
    Case,
    Measured,
    Plan,
    make_jobs,
    one_scale,
    peak_gib,
    reset_memory,
    say,
    sync,
)

from worker.engine import Progress, StyleTransfer
from worker.engine.diagnostics import HostReads
from worker.engine.groups import run_group

# ---------------------------------------------------------------------------------------- timing


def time_case(engine: StyleTransfer, case: Case, plan: Plan) -> Measured:
    """One one-scale group run of N2 iterations; s/it from the synchronised reads at N1 and N2."""
    every, n1, n2 = plan.counts[case.optimizer]
    stamps: dict[int, float] = {}

    def stamp(p: Progress) -> None:  # the first member still running stamps each read
        if p.iteration in (n1, n2) and p.iteration not in stamps:
            sync(plan)
            stamps[p.iteration] = time.perf_counter()

    jobs = make_jobs(case.size, case.batch, stamp)
    reset_memory(plan)
    sync(plan)
    t0 = time.perf_counter()
    outcomes = run_group(engine, jobs, one_scale(case, plan, n2), report_every=every)
    sync(plan)
    total = time.perf_counter() - t0
    failed = sum(o.error is not None for o in outcomes)
    if n1 not in stamps or n2 not in stamps:
        raise RuntimeError(f"no read at iterations {n1} and {n2}: every item failed ({outcomes[0].error})")
    spi = (stamps[n2] - stamps[n1]) / (n2 - n1)
    return Measured(spi, total, n2, peak_gib(plan), failed)


def run_seconds(engine: StyleTransfer, case: Case, plan: Plan, iterations: int, every: int) -> float:
    jobs = make_jobs(case.size, case.batch)
    sync(plan)
    t0 = time.perf_counter()
    run_group(engine, jobs, one_scale(case, plan, iterations), report_every=every)
    sync(plan)
    return time.perf_counter() - t0


def flops_line(case: Case, spi: float) -> str:
    tflops = GFLOP_512 * (case.size / 512) ** 2 * case.batch / spi / 1e3
    return f"{case.batch / spi:9.2f} img/s {tflops:8.3f} TFLOP/s {tflops / PEAK_TFLOPS:6.3f} of-peak"


def print_case(case: Case, m: Measured) -> None:
    peak = f"{m.peak_gib:6.2f} GiB" if m.peak_gib is not None else "   n/a GiB"
    note = f"  ({m.failed_items} items failed)" if m.failed_items else ""
    say(
        f"spi {case.label()} {m.spi:10.5f} s/it {flops_line(case, m.spi)}  peak {peak}  "
        f"one-time {m.one_time():6.2f} s{note}"
    )


def cross_check(engine: StyleTransfer, plan: Plan) -> None:
    """At the largest size, B = 1, default precision: s/it as (t(N2) - t(N1)) / (N2 - N1) of two
    runs with no reads in between, and the one-time cost as the intercept."""
    for opt in plan.optimizers:
        case = Case(opt, plan.default_precision(), max(plan.sizes), 1)
        _, n1, n2 = plan.counts[opt]
        try:
            run_seconds(engine, case, plan, 2, NO_READS)  # warm-up
            t1, t2 = (run_seconds(engine, case, plan, n, NO_READS) for n in (n1, n2))
        except Exception as exc:  # noqa: BLE001 - a bench case fails alone; the run goes on
            say(f"two-run {case.label()} error: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        spi = (t2 - t1) / (n2 - n1)
        one_time = (t1 * n2 - t2 * n1) / (n2 - n1)
        say(
            f"two-run {case.label()} {spi:10.5f} s/it  (t({n1}) {t1:.3f} s, t({n2}) {t2:.3f} s, "
            f"one-time {one_time:.3f} s; no host reads between)"
        )


# ----------------------------------------------------------------------------------------- syncs


def count_syncs(
    engine: StyleTransfer, case: Case, plan: Plan, iterations: int, every: int
) -> tuple[int, int]:
    """(CUDA sync warnings, host reads) during one run (warnings: -1 on the CPU)."""
    reads = HostReads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if plan.cuda():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with reads:
                run_group(
                    engine,
                    make_jobs(case.size, case.batch),
                    one_scale(case, plan, iterations),
                    report_every=every,
                )
        finally:
            if plan.cuda():
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) if plan.cuda() else -1
    return syncs, reads.count


def sync_lines(engine: StyleTransfer, plan: Plan) -> None:
    n1, n2 = plan.sync_counts
    for opt in plan.optimizers:
        case = Case(opt, plan.default_precision(), min(plan.sizes), 2)
        for every in (NO_READS, plan.sync_every):
            try:
                run_seconds(engine, case, plan, 2, NO_READS)  # warm-up: autotuning may sync
                (s1, r1), (s2, r2) = (count_syncs(engine, case, plan, n, every) for n in (n1, n2))
            except Exception as exc:  # noqa: BLE001 - a bench case fails alone; the run goes on
                say(f"syncs/iteration {case.label()} error: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            cuda = f"{(s2 - s1) / (n2 - n1):.2f}" if s1 >= 0 else "n/a (cpu)"
            reads = (r2 - r1) / (n2 - n1)
            name = "none between scale ends" if every == NO_READS else f"every {every}"
            say(
                f"syncs/iteration {case.label()} host reads {name:<23}: cuda syncs {cuda}, "
                f"host reads {reads:.2f}  (counts {s1}/{s2}, {r1}/{r2} at {n1}/{n2} it)"
            )


# ------------------------------------------------------------------------------------------- grid


def estimate(case: Case, done: dict[Case, Measured]) -> float | None:
    """Pessimistic seconds for a case: the largest measured one of its optimiser and precision with
    no more work (B x pixels), its wall time scaled by the work (batching only makes it cheaper)."""
    same = [
        (c, m)
        for c, m in done.items()
        if (c.optimizer, c.precision) == (case.optimizer, case.precision) and c.work() <= case.work()
    ]
    if not same:
        return None
    c, m = max(same, key=lambda cm: cm[0].work())
    return m.total_s * case.work() / c.work()


def grid_cases(plan: Plan) -> list[Case]:
    """Default precision and L-BFGS first (the default job's figures), small to large."""
    precisions = sorted(plan.precisions, key=lambda p: p != plan.default_precision())
    optimizers = sorted(plan.optimizers, key=lambda o: o != "lbfgs")
    return [
        Case(o, p, s, b)
        for p in precisions
        for o in optimizers
        for s in sorted(plan.sizes)
        for b in sorted(plan.batches)
    ]


def run_case(
    engine: StyleTransfer,
    case: Case,
    plan: Plan,
    failed: dict[tuple[str, str, int], int],
    done: dict[Case, Measured],
    skipped: list[str],
) -> None:
    key = (case.optimizer, case.precision, case.size)
    if key in failed and case.batch > failed[key]:
        skipped.append(f"{case.label()} (B={failed[key]} failed)")
        return say(f"spi {case.label()} skipped: B={failed[key]} failed at this size")
    est, left = estimate(case, done), plan.left() - (plan.graph_reserve_s if plan.graph_mode != "off" else 0)
    if left <= 0 or (est is not None and est > left):
        why = f"estimated {est:.0f} s > {max(left, 0):.0f} s left" if est else "the time budget is spent"
        skipped.append(f"{case.label()} ({why})")
        return say(f"spi {case.label()} skipped: {why}")
    error = None
    try:
        done[case] = time_case(engine, case, plan)
    except Exception as exc:  # noqa: BLE001 - a bench case (OOM, say) fails alone; the run goes on
        error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    if error is None:
        return print_case(case, done[case])
    failed[key] = min(failed.get(key, case.batch), case.batch)
    say(f"spi {case.label()} error: {error}")
    reset_memory(plan)  # outside the except: the traceback no longer holds the failed run's tensors
    return None


def run_grid(engine: StyleTransfer, plan: Plan) -> tuple[dict[Case, Measured], list[str]]:
    say(
        "\n# seconds per iteration (s/it) of a one-scale group run; img/s = B / (s/it); "
        "one-time = wall - N2 x s/it"
    )
    done: dict[Case, Measured] = {}
    failed: dict[tuple[str, str, int], int] = {}
    skipped: list[str] = []
    for case in grid_cases(plan):
        run_case(engine, case, plan, failed, done, skipped)
    return done, skipped
