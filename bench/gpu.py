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
- the L-BFGS direction alone (bench/gpu_lbfgs.py): the engine's solved form vs torch's two-loop order
  at B in {1, 16} x the largest size, history full: ms per direction and the speed-up;
- eager vs graph: the same one-scale case run eager, then with the VGG evaluation (forward and its
  backward) under torch.compile (worker.engine.graph; --graph, default mode "reduce-overhead": inductor
  and CUDA graphs), at B in {1, 16, 4, 64} (in that order, as the budget allows) x the largest size x
  both precisions, both optimisers: s/it eager, s/it graph, the speed-up, and the compile and
  capture time apart (the graph run's one-time less eager's). The whole model is tried first, then
  with conv1_1 eager (inductor's replication_pad2d_backward fails a stride assertion under
  channels_last); a failed attempt is printed as "graph: failed (<type>: <message>)" and the run
  goes on. Graph cells get what the grid leaves of the budget (at least --graph-reserve seconds), a
  cell is skipped when the last one's time (scaled up by B) no longer fits, and an attempt still
  compiling past the budget (+30 s) is stopped. A last line says whether graph mode was faster and
  by how much; the engine's production path stays eager either way;
- (--quick: the graph path with torch.compile's aot_eager backend, which traces but generates no
  code: it checks the code path on the CPU, its ratio is no speed figure)
- the issue's targets, with MISSED where one is not met (exit status 1; --quick never fails on them).
Cases that would not fit the time budget (--budget) are skipped and listed; a case that fails (out
of memory, say) is printed and the run goes on.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The sections live in sibling modules, bench/gpu_*.py (bench/ is no package). Run as a script, bench/ is
# sys.path[0] already; loaded from its path (the tests), bench/ is appended, last, so that its other
# scripts (engine.py, service.py, ...) shadow no module of the same name.
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

from gpu_common import DATASHEET_TFLOPS, GFLOP_512, PEAK_TFLOPS, Plan, say  # noqa: E402
from gpu_graph import graph_precisions, graph_size, graph_verdict, run_graphs  # noqa: E402
from gpu_lbfgs import direction_lines  # noqa: E402
from gpu_summary import default_job, summary  # noqa: E402
from gpu_timing import cross_check, run_grid, sync_lines  # noqa: E402

from worker.engine import StyleTransfer, TransferConfig  # noqa: E402
from worker.engine.graph import BACKENDS, MODES  # noqa: E402
from worker.engine.groups import DEFAULT_REPORT_EVERY_CUDA  # noqa: E402

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
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 390; --quick 120)")
    ap.add_argument(
        "--graph",
        choices=(*MODES, *BACKENDS, "off"),
        help="torch.compile mode or backend of the graph cells (default reduce-overhead; --quick aot_eager)",
    )
    ap.add_argument(
        "--graph-batches", help="B of the graph cells, in the order run (default 1,16,4,64; --quick 1)"
    )
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
        budget_s=args.budget or (120.0 if q else 390.0),  # + 30 s grace + start-up: < 8 min
        graph_mode=args.graph or ("aot_eager" if q else "reduce-overhead"),
        graph_batches=_ints(args.graph_batches or ("1" if q else "1,16,4,64")),
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
        f"peak: {PEAK_TFLOPS:.0f} TFLOP/s dense bf16 (H200, the team's figure; the SXM datasheet's "
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
    if "lbfgs" in plan.optimizers:
        direction_lines(plan)
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
