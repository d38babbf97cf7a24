"""`stylequeue run` and `stylequeue weights` (worker/run_cli.py) in-process, on a parser of their own."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker import run_cli
from worker.engine import objective as objective_mod
from worker.engine.vgg import build_features, random_init_

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stylequeue")
    sub = parser.add_subparsers(dest="command", required=True)
    run_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def files(tmp_path: Path, content: Image.Image, style: Image.Image) -> dict[str, Path]:
    content.save(tmp_path / "c.png")
    style.save(tmp_path / "s.jpg")
    return {"content": tmp_path / "c.png", "style": tmp_path / "s.jpg"}


def small_run(files: dict[str, Path], out: Path, iterations: int, *extra: str) -> list[str]:
    """``stylequeue run`` of the fixture images to ``out``: random weights, CPU, 32 -> 48 px."""
    head = ["run", str(files["content"]), str(files["style"]), "-o", str(out), "--weights", "random"]
    return [
        *head,
        "--size",
        "48",
        "--scales",
        "32,48",
        "--iterations",
        str(iterations),
        "--device",
        "cpu",
        *extra,
    ]


def test_run_end_to_end(tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out, trace, ck = tmp_path / "out.jpg", tmp_path / "trace.jsonl", tmp_path / "ck"
    argv = small_run(files, out, 3, "--trace", str(trace), "--checkpoint-dir", str(ck), "--save-every", "2")
    assert main(argv) == 0
    assert max(Image.open(out).size) == 48 and Image.open(out).format == "JPEG"
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 6 and [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"scale", "size", "iteration", "loss", "style_loss", "seconds"} <= set(lines[0])
    names = sorted(p.name for p in ck.iterdir())
    assert names == sorted(f"ckpt-s{s}-i{i}.{x}" for s in (0, 1) for i in (2, 3) for x in ("pt", "png"))
    assert "wrote" in capsys.readouterr().err
    resumed = tmp_path / "resumed.png"
    argv[4] = str(resumed)
    assert main([*argv, "--resume", str(ck / "ckpt-s1-i2.pt")]) == 0
    assert Image.open(resumed).size == Image.open(out).size


@pytest.mark.parametrize(
    "bad, needle",
    [
        (["missing.png", "S", "-o", "O.png"], "cannot read"),
        (["C", "S", "-o", "O.gif"], "must end in .png"),
        (["NOTIMG", "S", "-o", "O.png"], "not an image"),
        (["C", "S", "-o", "O.png", "--scales", "32,48", "--iterations", "1,2,3"], "iteration counts"),
        (["C", "S", "-o", "O.png", "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA"),
        (["C", "S", "-o", "O.png", "--resume", "NOTIMG"], "not a stylequeue checkpoint"),
        (["C", "S", "-o", "nodir/O.png"], "does not exist"),
        (["C", "S", "-o", "O.png", "--scale-factor", "1.0000000000000002"], "scale_factor must be between"),
        (["C", "S", "-o", "O.png", "--scale-factor", "nan"], "[invalid_config]"),
        (["C", "S", "-o", "O.png", "--scales", ",".join(map(str, range(16, 33)))], "[too_many_scales]"),
        (
            ["C", "S", "-o", "O.png", "--min-size", "16", "--scale-factor", "1.1", "--max-scales", "3"],
            "the maximum is 3",
        ),
        (["NARROW", "S", "-o", "O.png"], "[image_too_narrow]"),
        (["C", "NARROW", "-o", "O.png"], "style image 1 becomes 32x1 px"),
        (["C", "S", "-o", "O.png", "--content-weight", "nan"], "content_weight must be a finite"),
        (["C", "S", "-o", "O.png", "--style-weights", "inf"], "[invalid_config]"),
        (["C", "S", "-o", "O.png", "--lr", "-1"], "lr must be a finite number > 0"),
        (["C", "S", "-o", "O.png", "--preserve-color", "--color", "histogram"], "cannot be combined"),
        (["C", "S", "-o", "O.png", "--lbfgs-max-step", "0"], "lbfgs_max_step must be a finite number"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str], bad: list[str], needle: str
) -> None:
    (tmp_path / "junk.txt").write_text("not an image")
    Image.new("RGB", (600, 16), "gray").save(tmp_path / "narrow.png")  # 32x1 px at --size 32
    subst = {
        "C": str(files["content"]),
        "S": str(files["style"]),
        "NOTIMG": str(tmp_path / "junk.txt"),
        "NARROW": str(tmp_path / "narrow.png"),
    }
    argv = ["run", *[subst.get(a, a) for a in bad], "--weights", "random", "--size", "32", "--no-progress"]
    argv = [str(tmp_path / a) if a.startswith(("O.", "nodir", "missing")) else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stylequeue run: error:") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_diverged_run_exits_2(
    tmp_path: Path,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(objective_mod, "tv_loss", lambda x: x.sum(dim=(1, 2, 3)) * math.nan)  # never finite
    out = tmp_path / "out.png"
    argv = small_run(files, out, 4, "--max-recoveries", "2")
    assert main(argv) == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stylequeue run: error: the optimisation diverged") and "[diverged]" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_argparse_errors_exit_2(files: dict[str, Path]) -> None:
    for bad in (
        ["--iterations", "a,b"],
        ["--color", "sepia"],
        ["--lbfgs-max-step", "x"],
        ["--style-loss", "l2"],
        ["--loss-terms", "x"],
    ):
        with pytest.raises(SystemExit) as e:
            main(["run", str(files["content"]), str(files["style"]), "-o", "x.png", *bad])
        assert e.value.code == 2


@pytest.mark.parametrize("color", ["luminance", "histogram"])
def test_color_and_step_options(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str], color: str
) -> None:
    out, trace = tmp_path / "out.png", tmp_path / "trace.jsonl"
    argv = small_run(
        files, out, 3, "--color", color, "--lbfgs-max-step", "0.1", "--trace", str(trace), "--no-progress"
    )
    assert main(argv) == 0
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert lines[-1]["loss_removed"] > 0 and "style_removed" in lines[-1]
    assert "loss removed per scale:" in capsys.readouterr().err


def test_weights_fetch_and_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    f = build_features()
    random_init_(f, 1)
    src = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in f.state_dict().items()}, src)
    assert main(["weights", "fetch", "--from", str(src)]) == 2  # checksum is not torchvision's
    assert "expected a prefix" in capsys.readouterr().err
    named = src.with_name(f"vgg19-{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}.pth")
    src.rename(named)
    assert main(["weights", "fetch", "--from", str(named)]) == 0
    assert "installed" in capsys.readouterr().out
    assert main(["weights", "info"]) == 0
    out = capsys.readouterr().out
    assert "stylequeue-vgg19-features.pth" in out and "verified" in out and "not installed" in out


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, worker.run_cli; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_mask_style_loss_and_adam_options(
    tmp_path: Path, files: dict[str, Path], content: Image.Image, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = Image.new("L", content.size, 0)
    mask.paste(255, (0, 0, content.width // 2, content.height))
    mask.save(tmp_path / "m.png")
    out = tmp_path / "out.png"
    base = small_run(files, out, 2, "--no-progress")
    assert (
        main(
            [
                *base,
                "--mask",
                str(tmp_path / "m.png"),
                "--style-loss",
                "w2",
                "--loss-terms",
                "raw",
                "--optimizer",
                "adam",
                "--ema-decay",
                "0.9",
            ]
        )
        == 0
    )
    assert out.exists()
    for bad, needle in (
        (["--mask", str(tmp_path / "m.png")] * 2, "[invalid_mask]"),
        (["--ema-decay", "1"], "ema_decay must be"),
    ):
        out.unlink(missing_ok=True)
        capsys.readouterr()
        assert main([*base, *bad]) == 2 and not out.exists()
        assert needle in capsys.readouterr().err
