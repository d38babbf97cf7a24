"""GPU throughput of the engine, batched (a script, not a test): one prepared run on a CUDA machine.

    PYTHONPATH=. python3 bench/gpu.py            # CUDA, the whole grid, under 8 minutes on an H200
    PYTHONPATH=. python3 bench/gpu.py --quick    # the same code paths on the CPU, tiny sizes, 10-30 s
    PYTHONPATH=. python3 bench/gpu.py --sizes 512 --batches 1,16 --optimizers adam   # a smaller grid

Needs only python3 with torch, torchvision, Pillow and numpy, and this repository's worker.engine
(imports nothing else of the project); no network: seeded random VGG19 weights, which cost the same
FLOPs as the ImageNet ones, and images synthesised with numpy.

Figures, each printed as soon as it is measured:
- seconds per iteration (s/it) of run_group at B x size x precision x optimiser: one one-scale group
  run per case; the host reads every R iterations, and the timed window runs from the read at
  iteration N1 to the one at N2 (each followed by torch.cuda.synchronize()), so warm-up (cudnn
  autotuning) and the one-time costs (inputs, targets, results) stay outside it; those are
  reported apart ("one-time": the run's wall time less N2 x s/it). L-BFGS is timed with its history
  full (N1 >= 50 pairs), as in most of a real job. A two-run check, (t(N2) - t(N1)) / (N2 - N1)
  with no reads in between, is printed beside it at one case;
- images per second, TFLOP/s and the fraction of the bf16 peak (379 GFLOP per 512x512 iteration,
  scaled by pixels, against 790 TFLOP/s), peak GPU memory per case;
- host syncs per iteration (cuda: torch.cuda.set_sync_debug_mode warnings; both: host reads of
  tensor values), as count differences between two iteration counts;
- a default 512 job at B = 1 end to end (CUDA only), and default jobs per hour at each B estimated
  from the s/it figures (the default schedule's iterations x s/it interpolated by pixel count / B);
- eager vs graph: the same one-scale case run eager, then with the VGG evaluation (forward and its
  backward) under torch.compile (worker.engine.graph; --graph, default mode "reduce-overhead": inductor
  and CUDA graphs), at B in {1, 16} x the largest size x both precisions, both optimisers: s/it eager,
  s/it graph, the speed-up, and the compile and capture time apart (the graph run's one-time less
  eager's). The whole model is tried first, then with conv1_1 eager (inductor's
  replication_pad2d_backward fails a stride assertion under channels_last); a failed attempt is
  printed as "graph: failed (<type>: <message>)" and the run goes on. Graph cells get what the grid
  leaves of the budget (at least --graph-reserve seconds), a cell is skipped when the last one's time
  no longer fits, and an attempt still compiling past the budget (+30 s) is stopped. A last line says
  whether graph mode was faster and by how much; the engine's production path stays eager either way;
- (--quick: the graph path with torch.compile's aot_eager backend, which traces but generates no
  code: it checks the code path on the CPU, its ratio is no speed figure)
- the issue's targets, with MISSED where one is not met (exit status 1; --quick never fails on them).
Cases that would not fit the time budget (--budget) are skipped and listed; a case that fails (out
of memory, say) is printed and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.engine import BatchItem, Progress, StyleTransfer, TransferConfig  # noqa: E402
from worker.engine.diagnostics import HostReads  # noqa: E402
from worker.engine.graph import BACKENDS, MODES, compiled_features, cudagraph_skips  # noqa: E402
from worker.engine.groups import DEFAULT_REPORT_EVERY_CUDA, GroupJob, run_group  # noqa: E402
from worker.engine.schedule import Schedule, build_schedule  # noqa: E402
from worker.engine.transfer import resolve_device, resolve_precision  # noqa: E402
from worker.engine.vgg import VGGFeatures, layer_index  # noqa: E402

GFLOP_512 = 379.0  # VGG19 to relu5_1, forward + backward to the input, one 512x512 image (the issue's)
PEAK_TFLOPS = 790.0  # H200 dense bf16, as measured on this workplace's machines
DATASHEET_TFLOPS = 990.0  # the SXM datasheet's dense bf16: a higher peak only lowers the fraction
TARGET_JOB_S = 1.5  # a default 512 job at B = 1, seconds
TARGET_JOBS_PER_HOUR = 3000.0  # default 512 jobs per hour at the best B
TARGET_SPEEDUP = 10.0  # images/s at B = 16 over B = 1, at 512
TARGET_BATCH = 16
NO_READS = 10**6  # report_every that leaves only the scale-end read
STYLES = 4  # distinct style images in a group (targets cost is per distinct style)
GRAPH_VARIANTS = (("whole model", False), ("conv1_1 eager", True))  # (name, eager_head), in order
GRAPH_GRACE_S = 30.0  # a graph attempt still running this long past the budget is stopped
GRAPH_FIRST_S = {True: 5.0, False: 60.0}  # (quick?) seconds a first graph cell is assumed to need


def say(*parts: Any) -> None:
    print(*parts, flush=True)


@dataclass(frozen=True)
class Plan:
    quick: bool
    device: str
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    optimizers: tuple[str, ...]
    counts: dict[str, tuple[int, int, int]]  # optimiser -> (report_every R, N1, N2)
    sync_counts: tuple[int, int]  # iterations of the two sync-counting runs
    sync_every: int  # their report_every when counting with host reads (the CUDA default: 10)
    budget_s: float
    graph_mode: str  # a torch.compile mode or backend (worker.engine.graph), or "off"
    graph_batches: tuple[int, ...]
    graph_reserve_s: float  # of the budget, kept from the grid for the graph cells
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def default_precision(self) -> str:
        return "bf16" if resolve_precision("auto", resolve_device(self.device)) else "fp32"


@dataclass(frozen=True)
class Case:
    optimizer: str
    precision: str
    size: int
    batch: int

    def label(self) -> str:
        return f"{self.optimizer:<5} {self.precision:<4} {self.size:>4}px B={self.batch:<3}"

    def work(self) -> int:
        return self.batch * self.size * self.size


@dataclass
class Measured:
    spi: float  # seconds per iteration (the whole batch)
    total_s: float  # the run's wall time
    n2: int
    peak_gib: float | None
    failed_items: int

    def one_time(self) -> float:
        return self.total_s - self.n2 * self.spi


# ---------------------------------------------------------------------------------------- set-up


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny sizes, B in {1, 2}, few iterations")
    ap.add_argument("--sizes", help="square sizes in px (default 128,256,512; --quick 16,24)")
    ap.add_argument("--batches", help="group sizes B (default 1,4,16,64; --quick 1,2)")
    ap.add_argument("--precisions", help="fp32,bf16 (default both; bf16 only where supported)")
    ap.add_argument("--optimizers", default="lbfgs,adam", help="lbfgs,adam (default both)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 420; --quick 120)")
    ap.add_argument(
        "--graph",
        choices=(*MODES, *BACKENDS, "off"),
        help="torch.compile mode or backend of the graph cells (default reduce-overhead; --quick aot_eager)",
    )
    ap.add_argument("--graph-batches", help="B of the graph cells (default 1,16; --quick 1)")
    ap.add_argument(
        "--graph-reserve",
        type=float,
        help="seconds the grid leaves for the graph cells (default 150; --quick 30)",
    )
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    q = args.quick
    device = "cpu" if q else "cuda"
    precisions = tuple(p for p in (args.precisions or "bf16,fp32").split(",") if p)
    if not q and not torch.cuda.is_bf16_supported() and "bf16" in precisions:
        say("bf16: not supported on this device; bf16 cases skipped")
        precisions = tuple(p for p in precisions if p != "bf16")
    return Plan(
        quick=q,
        device=device,
        sizes=_ints(args.sizes or ("16,24" if q else "128,256,512")),
        batches=_ints(args.batches or ("1,2" if q else "1,4,16,64")),
        precisions=precisions,
        optimizers=tuple(o for o in args.optimizers.split(",") if o),
        # L-BFGS: N1 >= its 50-pair history, so the window runs with the history full
        counts={"adam": (2, 2, 4), "lbfgs": (2, 2, 4)}
        if q
        else {"adam": (10, 10, 30), "lbfgs": (25, 50, 75)},
        sync_counts=(4, 8) if q else (10, 30),
        sync_every=2 if q else DEFAULT_REPORT_EVERY_CUDA,
        budget_s=args.budget or (120.0 if q else 420.0),
        graph_mode=args.graph or ("aot_eager" if q else "reduce-overhead"),
        graph_batches=_ints(args.graph_batches or ("1" if q else "1,16")),
        graph_reserve_s=args.graph_reserve if args.graph_reserve is not None else (30.0 if q else 150.0),
    )


def header(plan: Plan) -> None:
    say(f"# python {' '.join(sys.argv)}")
    say(
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cudnn {torch.backends.cudnn.version()}, {torch.get_num_threads()} CPU threads"
    )
    if plan.cuda():
        p = torch.cuda.get_device_properties(0)
        say(
            f"device: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
    else:
        say(
            f"device: cpu ({platform.processor() or platform.machine()}) -- --quick: figures check the "
            "code paths, not the GPU"
        )
    say("weights: seeded random VGG19 (same FLOPs as the ImageNet weights); images: synthesised, square")
    say("fp32 = no autocast; on CUDA the engine turns on TF32 for matmuls and convolutions (fast_cuda_math)")
    say(
        f"peak: {PEAK_TFLOPS:.0f} TFLOP/s dense bf16 (H200 as measured here; the SXM datasheet's "
        f"~{DATASHEET_TFLOPS:.0f} only lowers the fractions); {GFLOP_512:.0f} GFLOP per 512x512 iteration"
    )
    say(
        f"plan: sizes {plan.sizes}, batches {plan.batches}, precisions {plan.precisions}, optimisers "
        f"{plan.optimizers}, (report_every, N1, N2) {plan.counts}, sync runs {plan.sync_counts} it "
        f"(reads every {plan.sync_every}), budget {plan.budget_s:.0f} s, default precision "
        f"{plan.default_precision()}"
    )
    full = plan.counts.get("lbfgs", (0, 0, 0))[1] >= TransferConfig().lbfgs_history
    say(
        f"L-BFGS timed with its {TransferConfig().lbfgs_history}-pair history "
        + ("full (the costliest step, as in most of a real job)" if full else "not yet full (short run)")
    )
    if plan.graph_mode == "off":
        say("graph: off (--graph off): eager only")
    else:
        say(
            f"graph: torch.compile {plan.graph_mode!r} of the VGG evaluation vs eager at B "
            f"{plan.graph_batches}, {graph_size(plan)} px, {graph_precisions(plan)}; the engine runs eager"
        )
    say("progress reads on cuda: one non-blocking copy to pinned memory + an event wait per report")


@lru_cache(maxsize=256)
def _image(size: int, seed: int) -> Image.Image:
    """A seeded smooth colour field plus fine noise, size x size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    noise = rng.normal(0.0, 12.0, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_jobs(size: int, batch: int, on_progress: Callable[[Progress], Any] | None = None) -> list[GroupJob]:
    """B jobs of one shape: each its own content, STYLES styles among them."""
    return [
        GroupJob(
            BatchItem(_image(size, b), [_image(size, 10_000 + b % STYLES)]), seed=b, on_progress=on_progress
        )
        for b in range(batch)
    ]


def one_scale(case: Case, plan: Plan, iterations: int) -> TransferConfig:
    return TransferConfig(
        size=case.size,
        min_size=case.size,
        scales=(case.size,),
        iterations=iterations,
        optimizer=case.optimizer,
        precision=case.precision,
        weights="random",
        device=plan.device,
        seed=0,
    )


def _sync(plan: Plan) -> None:
    if plan.cuda():
        torch.cuda.synchronize()


def _reset_memory(plan: Plan) -> None:
    gc.collect()
    if plan.cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(plan: Plan) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if plan.cuda() else None


# ---------------------------------------------------------------------------------------- timing


def time_case(engine: StyleTransfer, case: Case, plan: Plan) -> Measured:
    """One one-scale group run of N2 iterations; s/it from the synchronised reads at N1 and N2."""
    every, n1, n2 = plan.counts[case.optimizer]
    stamps: dict[int, float] = {}

    def stamp(p: Progress) -> None:  # the first member still running stamps each read
        if p.iteration in (n1, n2) and p.iteration not in stamps:
            _sync(plan)
            stamps[p.iteration] = time.perf_counter()

    jobs = make_jobs(case.size, case.batch, stamp)
    _reset_memory(plan)
    _sync(plan)
    t0 = time.perf_counter()
    outcomes = run_group(engine, jobs, one_scale(case, plan, n2), report_every=every)
    _sync(plan)
    total = time.perf_counter() - t0
    failed = sum(o.error is not None for o in outcomes)
    if n1 not in stamps or n2 not in stamps:
        raise RuntimeError(f"no read at iterations {n1} and {n2}: every item failed ({outcomes[0].error})")
    spi = (stamps[n2] - stamps[n1]) / (n2 - n1)
    return Measured(spi, total, n2, _peak_gib(plan), failed)


def run_seconds(engine: StyleTransfer, case: Case, plan: Plan, iterations: int, every: int) -> float:
    jobs = make_jobs(case.size, case.batch)
    _sync(plan)
    t0 = time.perf_counter()
    run_group(engine, jobs, one_scale(case, plan, iterations), report_every=every)
    _sync(plan)
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
    _reset_memory(plan)  # outside the except: the traceback no longer holds the failed run's tensors
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


# ------------------------------------------------------------------------------------------ graph


@dataclass
class GraphRow:
    case: Case
    eager: Measured
    graph: Measured
    variant: str

    def speedup(self) -> float:
        return self.eager.spi / self.graph.spi

    def compile_s(self) -> float:  # compile and capture: the graph run's one-time cost over eager's
        return self.graph.one_time() - self.eager.one_time()


@dataclass
class GraphState:
    rows: list[GraphRow] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # variant -> its first failure
    cell_s: list[float] = field(default_factory=list)  # wall time of each graph cell run
    notes: list[str] = field(default_factory=list)  # why cells went unmeasured
    stopped: bool = False  # the deadline hit: no more graph attempts (torch state unknown)


def graph_size(plan: Plan) -> int:
    return min(plan.sizes) if plan.quick else max(plan.sizes)


def graph_precisions(plan: Plan) -> tuple[str, ...]:
    """Both in the full run (default first); --quick: the default one (a compile per precision)."""
    ordered = tuple(sorted(plan.precisions, key=lambda p: p != plan.default_precision()))
    return ordered[:1] if plan.quick else ordered


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


@contextmanager
def _deadline(plan: Plan) -> Iterator[None]:
    """Raise TimeoutError in an attempt still running GRAPH_GRACE_S past the budget: a compile cannot
    be stopped between cells, and the whole run must end in time (POSIX main thread only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running {GRAPH_GRACE_S:.0f} s past the {plan.budget_s:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, stop) or signal.SIG_DFL
    signal.setitimer(signal.ITIMER_REAL, max(plan.left() + GRAPH_GRACE_S, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def graph_model(engine: StyleTransfer, case: Case, plan: Plan) -> VGGFeatures:
    """The engine's cached model that run_group will use for this case (the same key)."""
    cfg = one_scale(case, plan, 1)
    deepest = max(layer_index(n) for n in (*cfg.content_layers, *cfg.style_layers))
    spec = cfg.weights or engine.weights
    device = resolve_device(cfg.device or engine.device)
    return engine.model(spec, device, cfg.pooling, deepest, pad_replicate=cfg.pad_replicate)


def print_graph_row(row: GraphRow, plan: Plan, skips: int) -> None:
    note = f"  (CUDA graphs skipped {skips}x: inductor kernels only)" if skips else ""
    say(
        f"graph {row.case.label()} eager {row.eager.spi:10.5f} s/it  graph {row.graph.spi:10.5f} s/it  "
        f"speed-up {row.speedup():5.2f}x  compile+capture {row.compile_s():6.1f} s  "
        f"[{row.variant}, {plan.graph_mode}]{note}"
    )


def graph_attempt(
    engine: StyleTransfer,
    plan: Plan,
    eager: dict[Case, Measured],
    variant: tuple[str, bool],
    rows: list[GraphRow],
) -> None:
    """The cell's cases under one graph variant (one compile, shared by the optimisers), each row
    printed and added to ``rows`` as it is measured; raises what the attempt raised."""
    model = graph_model(engine, next(iter(eager)), plan)
    skips0 = cudagraph_skips()
    with _deadline(plan), compiled_features(model, plan.graph_mode, eager_head=variant[1]) as calls:
        for case, e in eager.items():
            measured = time_case(engine, case, plan)
            if calls.compiled == 0:  # the run used another model object: nothing ran compiled
                raise RuntimeError("the compiled forward was never called")
            rows.append(GraphRow(case, e, measured, variant[0]))
            print_graph_row(rows[-1], plan, cudagraph_skips() - skips0)


def graph_cell(engine: StyleTransfer, plan: Plan, cases: list[Case], state: GraphState) -> None:
    """One (precision, size, B): eager first, then the graph variants until one runs."""
    eager: dict[Case, Measured] = {}
    for case in cases:
        try:
            eager[case] = time_case(engine, case, plan)
        except Exception as exc:  # noqa: BLE001 - a bench case fails alone; the run goes on
            say(f"graph {case.label()} eager: failed ({_short(exc)})")
    if not eager:
        return state.notes.append(f"{cases[0].label()}: eager failed")
    for variant, head in GRAPH_VARIANTS:
        if variant in state.failed:
            say(f"graph {cases[0].label()} [{variant}] not retried: failed before ({state.failed[variant]})")
            continue
        rows: list[GraphRow] = []
        try:
            graph_attempt(engine, plan, eager, (variant, head), rows)
        except Exception as exc:  # noqa: BLE001 - a graph attempt fails alone; the run goes on
            state.failed[variant] = _short(exc)
            # past the deadline torch's state is unknown (a compile or a capture was cut): stop there
            state.stopped = isinstance(exc, TimeoutError) or plan.left() + GRAPH_GRACE_S <= 0
            say(f"graph {cases[0].label()} [{variant}] graph: failed ({_short(exc)})")
        state.rows += rows
        _reset_memory(plan)  # outside the except: the traceback no longer holds the attempt's tensors
        if rows or state.stopped:
            return None
    return state.notes.append(f"{cases[0].label()}: every graph variant failed")


def run_graphs(engine: StyleTransfer, plan: Plan) -> GraphState:
    size = graph_size(plan)
    say(
        f"\n# eager vs graph: s/it of the same one-scale run, eager, then the VGG evaluation under "
        f"torch.compile {plan.graph_mode!r}; compile+capture = the graph run's one-time less eager's"
    )
    state = GraphState()
    if plan.graph_mode == "off":
        state.notes.append("--graph off")
        say("graph: skipped (--graph off)")
        return state
    for prec in graph_precisions(plan):
        for b in plan.graph_batches:
            cases = [Case(o, prec, size, b) for o in plan.optimizers]
            # the last cell's time: its variants are the ones this cell will try (a failed one is
            # not retried, so the first cell is the dearest)
            need = state.cell_s[-1] if state.cell_s else GRAPH_FIRST_S[plan.quick]
            why = "a graph attempt was stopped at the deadline" if state.stopped else None
            if why is None and plan.left() < need:
                why = f"estimated {need:.0f} s > {max(plan.left(), 0):.0f} s left"
            if why is not None:
                state.notes.append(f"{cases[0].label()} skipped")
                say(f"graph {cases[0].label()} skipped: {why}")
                continue
            t0 = time.perf_counter()
            graph_cell(engine, plan, cases, state)
            state.cell_s.append(time.perf_counter() - t0)
    return state


def graph_verdict(plan: Plan, state: GraphState) -> None:
    """The last word on graph mode: faster or not, by how much, or why it could not be measured."""
    tail = "; the engine's production path stays eager (not switched)"
    if not state.rows:
        why = "; ".join([*(f"{v}: {e}" for v, e in state.failed.items()), *state.notes]) or "no cell ran"
        return say(f"graph verdict: could not be measured ({why}){tail}")
    ups = sorted(state.rows, key=GraphRow.speedup)
    mean = math.exp(sum(math.log(r.speedup()) for r in ups) / len(ups))
    faster = sum(r.speedup() > 1 for r in ups)
    spread = (
        f"{mean:.2f}x eager's speed, geometric mean of {len(ups)} rows, faster in {faster}; from "
        f"{ups[0].speedup():.2f}x ({ups[0].case.label().strip()}) to {ups[-1].speedup():.2f}x "
        f"({ups[-1].case.label().strip()}); compile+capture up to {max(r.compile_s() for r in ups):.1f} s"
    )
    if plan.quick:
        return say(
            f"graph verdict: not a speed measurement (--quick: CPU toy sizes): the graph path ran "
            f"({plan.graph_mode}; {spread}){tail}"
        )
    verdict = "faster" if mean > 1 else "not faster"
    return say(f"graph verdict: graph mode ({plan.graph_mode}) {verdict}: {spread}{tail}")


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
    content, style = _image(512, 0), _image(512, 10_000)
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
            _reset_memory(plan)
            _sync(plan)
            t0 = time.perf_counter()
            fn()
            _sync(plan)
            seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a bench case fails alone; the run goes on
            say(f"default job {name}: error: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        say(f"default job {name}: {seconds:8.3f} s  peak {_peak_gib(plan) or 0:.2f} GiB")
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


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.quick and not torch.cuda.is_available():
        say("no CUDA device here: bench/gpu.py measures a GPU; run it with --quick to check it on the CPU")
        return 2
    plan = make_plan(args)
    header(plan)
    engine = StyleTransfer(weights="random", device=plan.device, seed=0)
    say(
        "\n# host syncs per iteration: (count(N2) - count(N1)) / (N2 - N1), B=2 at the smallest size; on "
        "cuda a report's event wait counts as 1 host read (set_sync_debug_mode does not see event waits)"
    )
    sync_lines(engine, plan)
    warm_job = default_job(engine, plan)
    say("\n# two-run check (the robust way) at the largest size, B=1")
    cross_check(engine, plan)
    done, skipped = run_grid(engine, plan)
    say(f"skipped: {len(skipped)}" + "".join(f"\n  {s}" for s in skipped))
    graphs = run_graphs(engine, plan)
    ok = summary(done, plan, warm_job)
    say("")
    graph_verdict(plan, graphs)
    say(f"\ndone in {time.perf_counter() - plan.t0:.0f} s of a {plan.budget_s:.0f} s budget")
    if plan.quick:
        return 0  # CPU toy sizes: the targets are no verdict here
    if not ok:
        say("targets: MISSED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
