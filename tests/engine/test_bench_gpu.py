"""bench/gpu.py (the GPU throughput bench) runs its code paths on the CPU (--quick) and imports only what
a GPU machine with no project install has: the standard library, torch, torchvision, PIL, numpy,
worker.engine and its own sections, the sibling modules bench/gpu_*.py."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from worker.engine import StyleTransfer
from worker.engine.graph import compiled_features

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"
# the script and its sections (bench/ is no package: the script puts bench/ on sys.path to import them)
FILES = sorted((REPO / "bench").glob("gpu*.py"))
SIBLINGS = {path.stem for path in FILES if path != SCRIPT}
THIRD_PARTY = {"torch", "torchvision", "PIL", "numpy"}
FORBIDDEN = {"api", "shared", "celery", "sqlalchemy", "pydantic", "boto3", "botocore", "redis", "kombu"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_quick_run_measures_every_case_and_counts_syncs() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--quick", "--budget", "1000"],  # nothing skipped on a busy CI
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    spi = re.findall(r"^spi (lbfgs|adam) +(fp32|bf16) +(\d+)px B=(\d+) +([\d.]+) s/it", out, re.M)
    # 2 optimisers x 2 precisions x sizes 16, 24 x B 1, 2, every one measured
    assert len(spi) == 16, out
    assert {(o, p, int(s), int(b)) for o, p, s, b, _ in spi} == {
        (o, p, s, b) for o in ("lbfgs", "adam") for p in ("fp32", "bf16") for s in (16, 24) for b in (1, 2)
    }
    assert all(float(v) > 0 for *_, v in spi)
    reads = re.findall(
        r"^syncs/iteration (lbfgs|adam) .*host reads (none|every) .*host reads ([\d.]+)", out, re.M
    )
    assert len(reads) == 4, out
    for _, cadence, per_iteration in reads:  # the steps read nothing; the reports do
        assert (float(per_iteration) == 0) == (cadence == "none"), reads
    assert re.search(r"^two-run lbfgs .* s/it", out, re.M) and re.search(r"^two-run adam .* s/it", out, re.M)
    # eager vs graph (aot_eager on the CPU): one row per optimiser at 16 px, B=1, fp32
    graph = re.findall(
        r"^graph (lbfgs|adam) +fp32 +16px B=1 +eager +([\d.]+) s/it +graph +([\d.]+) s/it "
        r"+speed-up +([\d.]+)x +compile\+capture +(-?[\d.]+) s +\[whole model, aot_eager\]",
        out,
        re.M,
    )
    assert sorted(g[0] for g in graph) == ["adam", "lbfgs"], out
    assert all(float(e) > 0 and float(g) > 0 for _, e, g, *_ in graph)
    verdict = re.findall(r"^graph verdict: (.*)$", out, re.M)
    assert len(verdict) == 1 and "not a speed measurement" in verdict[0] and "stays eager" in verdict[0]
    assert out.index("graph verdict:") > out.index("\ntarget ")  # the last word, after the targets
    assert re.search(r"^jobs/hour lbfgs fp32 B=2 +[\d.]+ s/job", out, re.M)
    assert out.count("\ntarget ") == 4 and "skipped: 0" in out


def _imported_modules(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"relative import at line {node.lineno}"
            names.append(node.module)
    return names


def _disallowed(names: list[str]) -> list[str]:
    """The imported modules a GPU machine with no project install may lack."""
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY | SIBLINGS | {"__future__"}
    bad = []
    for name in names:
        top = name.split(".")[0]
        if top == "worker":
            ok = name == "worker.engine" or name.startswith("worker.engine.")
        else:
            ok = top in allowed and (top not in SIBLINGS or name == top)
        if not ok:
            bad.append(name)
    return bad


def test_the_script_imports_only_the_standard_library_torch_and_the_engine() -> None:
    assert SCRIPT in FILES and {"gpu_common", "gpu_graph", "gpu_summary", "gpu_timing"} <= SIBLINGS
    script = _imported_modules(ast.parse(SCRIPT.read_text()))
    assert "worker.engine" in script and set(script) >= SIBLINGS  # no stray gpu_*.py: each is a section
    for path in FILES:
        names = _imported_modules(ast.parse(path.read_text()))
        assert not _disallowed(names), (path.name, _disallowed(names))


def test_the_import_check_refuses_the_service_and_its_libraries() -> None:
    source = "\n".join(
        [
            "import os",
            "import torch.nn",
            "from gpu_common import Plan",
            "from worker.engine.groups import run_group",
            "import shared.cli",
            "from celery import Celery",
            "import worker.tasks",
            "import workerx",
            "from api.app import app",
            "import gpu_common.x",
        ]
    )
    assert _disallowed(_imported_modules(ast.parse(source))) == [
        "shared.cli",
        "celery",
        "worker.tasks",
        "workerx",
        "api.app",
        "gpu_common.x",
    ]


def test_loading_the_script_pulls_in_none_of_the_service() -> None:
    """What the engine imports in turn: nothing of the service's packages or their libraries."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_bench', {str(SCRIPT)!r})\n"
        "module = sys.modules['gpu_bench'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.split()
    assert "worker.engine.groups" in loaded and set(loaded) >= SIBLINGS  # the sections, found
    assert not {m.split(".")[0] for m in loaded} & FORBIDDEN
    project = [m for m in loaded if m.split(".")[0] == "worker"]
    assert all(m in ("worker", "worker.engine") or m.startswith("worker.engine.") for m in project), project


def _bench() -> ModuleType:
    """bench/gpu.py loaded in this process, once (its sections, bench/gpu_*.py, are imported once, as
    top-level modules, and their dataclasses look their module up by name)."""
    name = "gpu_bench_in_process"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _graph_section() -> ModuleType:
    """bench/gpu_graph.py, as the script imported it (the module whose globals its functions read)."""
    return sys.modules[_bench().run_graphs.__module__]


def _graph_run(bench: ModuleType, engine: StyleTransfer, *argv: str) -> tuple[Any, Any]:
    """The graph section and its verdict alone: --quick, 16 px, B=1, Adam (plan, state)."""
    plan = bench.make_plan(bench._args(["--quick", "--sizes", "16", "--optimizers", "adam", *argv]))
    state = bench.run_graphs(engine, plan)
    bench.graph_verdict(plan, state)
    return plan, state


def test_a_failing_graph_attempt_is_reported_and_the_run_goes_on(
    engine: StyleTransfer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the known replication_pad2d_backward stride assertion would: every variant is tried and
    reported, nothing is raised, and the verdict says graph mode could not be measured."""

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("stride assertion\nmore lines that stay out")

    bench = _bench()
    monkeypatch.setattr(torch, "compile", broken)
    plan, state = _graph_run(bench, engine)
    out = capsys.readouterr().out
    assert not state.rows
    assert "[whole model] graph: failed (RuntimeError: stride assertion)" in out
    assert "[conv1_1 eager] graph: failed (RuntimeError: stride assertion)" in out
    assert re.search(r"^graph verdict: could not be measured \(whole model: RuntimeError", out, re.M)
    assert "more lines" not in out
    graph = _graph_section()
    model = graph.graph_model(engine, graph.Case("adam", "fp32", 16, 1), plan)
    assert "forward" not in vars(model)  # eager again


def test_graph_cells_past_the_budget_are_skipped_or_stopped_with_a_reason(
    engine: StyleTransfer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    _graph_run(bench, engine, "--budget", "0.001")  # spent before the first cell
    out = capsys.readouterr().out
    assert re.search(r"^graph adam .* skipped: estimated 5 s > 0 s left", out, re.M), out
    assert "graph verdict: could not be measured" in out
    # a cell that starts in time but outruns the deadline is stopped, and the cells after it skipped
    monkeypatch.setattr(_graph_section(), "GRAPH_FIRST_S", {True: -1.0, False: -1.0})
    monkeypatch.setattr(_graph_section(), "GRAPH_GRACE_S", 0.0)

    @contextlib.contextmanager
    def endless_compile(*_args: object, **_kwargs: object) -> Iterator[Any]:
        # a compile that never ends, in Python, inside the attempt's deadline, so the alarm lands
        # here (a real one may land inside torch.compile, which can swallow it: a flaky test)
        never = threading.Event()
        while not never.wait(0.01):
            pass
        yield None

    monkeypatch.setattr(_graph_section(), "compiled_features", endless_compile)
    _graph_run(bench, engine, "--budget", "0.001", "--graph-batches", "1,2")
    out = capsys.readouterr().out
    assert "[whole model] graph: failed (TimeoutError: still running 0 s past" in out, out
    assert "conv1_1 eager" not in out  # not tried after the deadline
    assert re.search(r"^graph adam .*B=2 .* skipped: a graph attempt was stopped at the deadline", out, re.M)


def test_graph_cells_run_b_first_and_a_larger_b_is_assumed_dearer(
    engine: StyleTransfer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both precisions at each B before the next B; the next cell's estimate is the last one's time
    scaled up by B (never down), so a cell at 4x the B of one that took 1 s is skipped with 3 s left."""
    graph = _graph_section()
    ran: list[tuple[str, int]] = []
    clock = iter(range(1000))  # perf_counter, read before and after each cell: each takes 1 s

    def cell(_engine: object, _plan: object, cases: list[Any], _state: object) -> None:
        ran.append((cases[0].precision, cases[0].batch))

    monkeypatch.setattr(graph, "graph_cell", cell)
    monkeypatch.setattr(graph.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(graph, "graph_precisions", lambda _plan: ("fp32", "bf16"))
    monkeypatch.setattr(graph, "GRAPH_FIRST_S", {True: 1.0, False: 1.0})
    plan = _bench().make_plan(_bench()._args(["--quick", "--sizes", "16", "--optimizers", "adam"]))
    plan = dataclasses.replace(plan, graph_batches=(1, 2, 8))
    monkeypatch.setattr(type(plan), "left", lambda _self: 3.0)
    state = graph.run_graphs(engine, plan)
    assert ran == [("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)]
    assert [b for b, _ in state.cell_s] == [1, 1, 2, 2]
    out = capsys.readouterr().out
    assert re.search(r"^graph adam .*B=8 .* skipped: estimated 4 s > 3 s left", out, re.M), out


@pytest.mark.parametrize("eager_head", [False, True])
def test_the_compiled_evaluation_matches_eager_and_leaves_the_model_eager(
    engine: StyleTransfer, eager_head: bool
) -> None:
    """worker.engine.graph (aot_eager: traced, no code generated): the same features and input
    gradient as eager; passes without a gradient stay eager; on exit the model is eager again."""
    model = engine.model("random", torch.device("cpu"), "max", 29)
    wanted = frozenset({0, 1, 6, 11, 20, 22, 29})

    def evaluate() -> tuple[list[torch.Tensor], torch.Tensor]:
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        feats = model(x, wanted)
        torch.autograd.backward(sum(f.square().mean() for f in feats.values()))
        assert x.grad is not None and sorted(feats) == sorted(wanted)
        return [f.detach() for _, f in sorted(feats.items())], x.grad

    want = evaluate()
    with compiled_features(model, "aot_eager", eager_head=eager_head) as calls:
        got = evaluate()
        with torch.no_grad():
            model(torch.rand(1, 3, 16, 16), wanted)  # a target pass
    assert (calls.compiled, calls.eager) == (1, 1)
    assert "forward" not in vars(model)
    for a, b in zip([*want[0], want[1]], [*got[0], got[1]], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
