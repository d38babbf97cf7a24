"""The engine commands: `stylequeue run` and `stylequeue weights fetch|info`.

Importing this module does not import torch: the engine is imported by the handlers and by `run`'s
parser, whose engine options are generated from TransferConfig (``worker.run_options``). The
dispatcher (shared/cli.py) builds that parser only when `run` is the command, so `stylequeue --help`
stays fast; it calls ``register(subparsers, names)``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared import logs
from worker import run_options

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


SUMMARY = {
    "run": "stylise an image locally (no server)",
    "weights": "install or inspect the VGG19 weights",
}


def register(subparsers: Any, names: Iterable[str] | None = None) -> None:
    """Add `run` and `weights` (or those of them in ``names``) to an argparse subparsers object."""
    adders = {"run": _add_run, "weights": _add_weights}
    for name in SUMMARY if names is None else names:
        adders[name](subparsers)


def _add_run(sub: Any) -> None:
    """`run`: its own options here, the engine's generated from TransferConfig (this imports torch)."""
    from worker.engine import save_image

    engine_options = run_options.engine_options()
    quality = inspect.signature(save_image).parameters["quality"].default
    p = sub.add_parser(
        "run",
        help=SUMMARY["run"],
        description="Gatys-style neural style transfer on VGG19, coarse to fine. Unset options use "
        "the engine's defaults (see README).",
    )
    p.add_argument("content", help="content image (PNG, JPEG, WebP, BMP, TIFF, GIF)")
    p.add_argument("styles", nargs="+", metavar="STYLE", help="one or more style images")
    p.add_argument("-o", "--output", required=True, help="output file: .png, .jpg or .webp")
    a = p.add_argument
    a(
        "--mask",
        action="append",
        metavar="MASK",
        dest="masks",
        help="one per style, in order: a greyscale image over the content (white: that style here)",
    )
    a("--checkpoint-dir", type=Path, help="write ckpt-s{scale}-i{iter}.pt and a PNG preview here")
    a("--resume", type=Path, metavar="CHECKPOINT_FILE", help="continue from a checkpoint")
    a("--quality", type=int, default=quality, help=f"JPEG/WebP quality (default {quality})")
    a("--trace", type=Path, metavar="FILE", help="write one JSON line per iteration")
    a("--no-progress", action="store_true", help="no progress bar")
    run_options.add_engine_options(p, engine_options)
    p.set_defaults(func=cmd_run)


def _add_weights(sub: Any) -> None:
    w = sub.add_parser("weights", help=SUMMARY["weights"])
    wsub = w.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="download (or convert --from FILE) the features-only copy")
    f.add_argument("--from", dest="from_file", type=Path, help="a full torchvision vgg19 .pth file")
    f.add_argument("--force", action="store_true", help="convert even if the checksum differs")
    wsub.add_parser("info", help="show installed weights (paths, sizes, sha256)")
    w.set_defaults(func=cmd_weights)


def _fail(command: str, message: str) -> int:
    print(f"stylequeue {command}: error: {message}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    """Warnings and errors on stderr when nothing configured logging yet (the dispatcher does)."""
    if not logging.getLogger().handlers:
        logs.configure(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging()
    out = Path(args.output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        return _fail("run", f"output {out} must end in .png, .jpg or .webp")
    if not out.parent.is_dir():
        return _fail("run", f"output directory {out.parent} does not exist")
    from worker.engine import EngineError

    try:
        return _run(args, out)
    except EngineError as e:
        return _fail("run", f"{e.message} [{e.code}]")
    except KeyboardInterrupt:
        print("stylequeue run: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, out: Path) -> int:
    from worker.engine import Checkpoint, StyleTransfer, TransferConfig, load_image, save_image

    config = TransferConfig(**run_options.config_kwargs(args))
    content = load_image(args.content)
    styles = [load_image(s) for s in args.styles]
    masks = [load_image(m) for m in args.masks] if args.masks else None
    resume = None
    if args.resume is not None:
        try:
            resume = Checkpoint.from_bytes(args.resume.read_bytes())
        except OSError as e:
            return _fail("run", f"cannot read checkpoint {args.resume}: {e.strerror or e}")
    if args.checkpoint_dir is not None:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    engine = StyleTransfer(weights=args.weights, device=config.device or "auto", seed=config.seed)
    with _Reporter(args) as reporter:
        result = engine.run(
            content,
            styles,
            config,
            masks=masks,
            on_progress=reporter.progress,
            on_checkpoint=reporter.checkpoint,
            resume=resume,
        )
    save_image(result.image, out, quality=args.quality)
    meta = result.metadata
    fell = " ".join(
        "-" if r is None or r["loss"] is None else f"{100 * r['loss']:.0f}%" for r in meta["loss_removed"]
    )
    print(
        f"wrote {out} ({result.image.width}x{result.image.height}, {meta['steps']} steps, "
        f"{meta['seconds']:.1f} s, weights {meta['weights_kind']}; loss removed per scale: {fell})",
        file=sys.stderr,
    )
    return 0


class _Reporter:
    """Progress bar (tqdm on stderr), JSON-lines trace and checkpoint files for one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bar: Any = None
        self.trace: Any = None

    def __enter__(self) -> _Reporter:
        if self.args.trace is not None:
            self.trace = open(self.args.trace, "w", encoding="utf-8")  # noqa: SIM115
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trace is not None:
            self.trace.close()

    def progress(self, p: Any) -> None:
        if self.trace is not None:
            self.trace.write(
                json.dumps(
                    {
                        "scale": p.scale,
                        "size": list(p.size),
                        "iteration": p.iteration,
                        "step": p.step,
                        "loss": p.loss,
                        "content_loss": p.content_loss,
                        "style_loss": p.style_loss,
                        "tv_loss": p.tv_loss,
                        "seconds": round(p.elapsed, 4),
                        "lr": p.lr,
                        "recoveries": p.recoveries,
                        "loss_removed": p.loss_removed,
                        "content_removed": p.content_removed,
                        "style_removed": p.style_removed,
                        "tv_removed": p.tv_removed,
                    }
                )
                + "\n"
            )
        if self.args.no_progress:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total_steps, initial=p.step - 1, file=sys.stderr, unit="it")
        self.bar.set_description(f"scale {p.scale + 1}/{p.scales} {p.size[1]}x{p.size[0]}")
        self.bar.set_postfix_str(f"loss {p.loss:.4g}", refresh=False)
        self.bar.update(1)

    def checkpoint(self, ckpt: Any) -> None:
        directory = self.args.checkpoint_dir
        if directory is None:
            return
        from worker.engine.images import tensor_to_pil

        stem = directory / f"ckpt-s{ckpt.scale}-i{ckpt.iteration}"
        Path(f"{stem}.pt").write_bytes(ckpt.to_bytes())
        tensor_to_pil(ckpt.image[0]).save(f"{stem}.png")


def cmd_weights(args: argparse.Namespace) -> int:
    _setup_logging()
    from worker.engine import EngineError
    from worker.engine import weights as w

    try:
        if args.weights_command == "fetch":
            path = w.fetch(args.from_file, force=args.force)
            print(f"installed {path} ({path.stat().st_size / 2**20:.1f} MB)")
            return 0
        print(f"torch hub checkpoints: {w.checkpoints_dir()}")
        for row in w.info():
            if not row["exists"]:
                print(f"  {row['path']}: not installed")
                continue
            mb = int(row["bytes"]) / 2**20  # type: ignore[call-overload]
            ok = "verified" if row["verified"] else "NOT VERIFIED"
            print(f"  {row['path']}: {mb:.1f} MB sha256 {row['sha256']} ({ok})")
        return 0
    except EngineError as e:
        return _fail(f"weights {args.weights_command}", f"{e.message} [{e.code}]")
