"""bench/engine.py part (f) (loss removed per scale, weights x1 and x1e-3) runs and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_removed_fractions_part_runs_on_a_tiny_pyramid() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "bench/engine.py",
            "--parts",
            "f",
            "--size",
            "48",
            "--min-size",
            "24",
            "--iterations",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 1 is a missed target (a measurement at this toy size), not a crash
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    out = proc.stdout
    assert "(f) fraction of each loss term removed" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [r[:3] for r in rows] == [["0", "24x24", "2"], ["1", "34x34", "2"], ["2", "48x48", "2"]]
    assert "substantial at every scale" in out and "x1e-3 matches x1 (|difference|" in out
    assert "== metadata['loss_removed']: yes" in out  # Progress and Result agree at every scale end
    assert ("targets: MISSED" in out) == (proc.returncode == 1)
