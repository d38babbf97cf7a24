"""worker/engine imports only torch, torchvision, PIL, numpy and the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"torch", "torchvision", "PIL", "numpy"} | set(sys.stdlib_module_names)
FORBIDDEN = ("celery", "sqlalchemy", "boto3", "redis", "api", "shared")


def test_engine_source_imports_only_allowed_modules() -> None:
    files = sorted((ROOT / "worker" / "engine").glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"


def test_importing_engine_loads_no_service_modules() -> None:
    code = (
        "import sys, worker.engine\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""
