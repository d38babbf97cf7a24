"""bench/gpu.py (the GPU throughput bench) runs its code paths on the CPU (--quick) and imports only what
a GPU machine with no project install has: the standard library, torch, torchvision, PIL, numpy and
worker.engine."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"
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
    assert "graph: not implemented" in out
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


def test_the_script_imports_only_the_standard_library_torch_and_the_engine() -> None:
    names = _imported_modules(ast.parse(SCRIPT.read_text()))
    assert "worker.engine" in names
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY
    for name in names:
        top = name.split(".")[0]
        if top == "worker":
            assert name == "worker.engine" or name.startswith("worker.engine."), name
        else:
            assert top in allowed or top == "__future__", name


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
    assert "worker.engine.groups" in loaded
    assert not {m.split(".")[0] for m in loaded} & FORBIDDEN
    project = [m for m in loaded if m.split(".")[0] == "worker"]
    assert all(m in ("worker", "worker.engine") or m.startswith("worker.engine.") for m in project), project
