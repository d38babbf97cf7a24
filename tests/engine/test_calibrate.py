"""bench/calibrate.py (the sweep for the first run on real weights) runs offline on random weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_calibration_sweep_runs_on_random_weights(tmp_path: Path) -> None:
    out = tmp_path / "calib"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/calibrate.py",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--size",
            "32",
            "--ratios",
            "3,10",
            "--layer-weights",
            "both",
            "--tv",
            "0",
            "--iterations",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "figures are for the real weights" in proc.stdout
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows if isinstance(rows, list) else rows["jobs"]) == 4
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width >= 2 * 32 and sheet.height >= 2 * 32  # 2 style weights x 2 layer choices
