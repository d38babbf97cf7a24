"""bench/gpu.py's eager-vs-graph section: the same one-scale case eager, then with the VGG evaluation
under torch.compile (worker.engine.graph), the speed-up and the compile and capture time apart; each
failure reported, the graph cells held to the time budget, and a last verdict line."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gpu_common import Case, Measured, Plan, one_scale, reset_memory, say
from gpu_timing import time_case

from worker.engine import StyleTransfer
from worker.engine.graph import compiled_features, cudagraph_skips
from worker.engine.transfer import resolve_device
from worker.engine.vgg import VGGFeatures, layer_index

GRAPH_VARIANTS = (("whole model", False), ("conv1_1 eager", True))  # (name, eager_head), in order
GRAPH_GRACE_S = 30.0  # a graph attempt still running this long past the budget is stopped
GRAPH_FIRST_S = {True: 5.0, False: 60.0}  # (quick?) seconds a first graph cell is assumed to need


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
    cell_s: list[tuple[int, float]] = field(default_factory=list)  # (B, wall time) of each cell run
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
        reset_memory(plan)  # outside the except: the traceback no longer holds the attempt's tensors
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
    # B first, both precisions at each: the cells the budget may not reach are the last B listed
    for b in plan.graph_batches:
        for prec in graph_precisions(plan):
            cases = [Case(o, prec, size, b) for o in plan.optimizers]
            need = _cell_estimate(state, b, plan)
            why = "a graph attempt was stopped at the deadline" if state.stopped else None
            if why is None and plan.left() < need:
                why = f"estimated {need:.0f} s > {max(plan.left(), 0):.0f} s left"
            if why is not None:
                state.notes.append(f"{cases[0].label()} skipped")
                say(f"graph {cases[0].label()} skipped: {why}")
                continue
            t0 = time.perf_counter()
            graph_cell(engine, plan, cases, state)
            state.cell_s.append((b, time.perf_counter() - t0))
    return state


def _cell_estimate(state: GraphState, b: int, plan: Plan) -> float:
    """Seconds the next cell (at ``b``) is assumed to need: the last cell's time, its variants being
    the ones this cell will try (a failed one is not retried, so the first cell is the dearest),
    scaled by B when it is larger (an iteration's time grows with B; compiling does not, so this
    errs long)."""
    if not state.cell_s:
        return GRAPH_FIRST_S[plan.quick]
    last_b, last_s = state.cell_s[-1]
    return last_s * max(1.0, b / last_b)


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
