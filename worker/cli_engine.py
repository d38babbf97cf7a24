"""`stylequeue run` and `stylequeue weights fetch|info`.

Importing this module does not import torch: the engine is imported inside the handlers, so
`stylequeue --help` stays fast. shared/cli.py calls register(subparsers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _list(kind: type, name: str) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return values
    return parse


def _iterations(text: str) -> int | tuple[int, ...]:
    values = _list(int, "integers")(text)
    return values[0] if len(values) == 1 and "," not in text else values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="stylise an image locally (no server)",
        description="Gatys-style neural style transfer on VGG19, coarse to fine. Unset options use "
        "the engine's defaults (see README).",
    )
    p.add_argument("content", help="content image (PNG, JPEG, WebP, BMP, TIFF, GIF)")
    p.add_argument("styles", nargs="+", metavar="STYLE", help="one or more style images")
    p.add_argument("-o", "--output", required=True, help="output file: .png, .jpg or .webp")
    a = p.add_argument
    a("--size", type=int, help="output long edge in px (default 512)")
    a("--min-size", type=int, help="first scale's long edge (default 128)")
    a("--scale-factor", type=float, help="growth per scale, 1.1 to 4 (default 1.414)")
    a("--scales", type=_list(int, "integers"), help="explicit long edges, e.g. 128,256,512")
    a("--iterations", type=_iterations, help="per scale: one int, or a comma list (default auto)")
    a("--style-weights", type=_list(float, "numbers"), help="blend weights, one per style")
    a("--mask", action="append", metavar="MASK", dest="masks",
      help="one per style, in order: a greyscale image over the content (white: that style here)")
    a("--loss-terms", choices=["relative", "raw"],
      help="relative: each term divided by its target's energy (default); raw: the papers' terms")
    a("--style-loss", choices=["gram", "w2"],
      help="gram: Gram-matrix MSE (default); w2: Wasserstein-2 between feature Gaussians")
    a("--content-weight", type=float)
    a("--style-weight", type=float)
    a("--tv-weight", type=float)
    a("--style-layers", type=_names, help="e.g. relu1_1,relu2_1,relu3_1,relu4_1,relu5_1")
    a("--style-layer-weights", type=_list(float, "numbers"), help="one per style layer")
    a("--content-layers", type=_names, help="e.g. relu4_2")
    a("--optimizer", choices=["lbfgs", "adam"])
    a("--lr", type=float, help="step size (default 1 for lbfgs, 0.02 for adam)")
    a("--ema-decay", type=float, help="adam: average the iterates with this decay (default 0.99; 0 off)")
    a("--lbfgs-history", type=int)
    a("--lbfgs-max-step", type=float,
      help="largest pixel change (0-1 range) in one L-BFGS step; longer steps shrink (default 0.25)")
    a("--no-carry-optimizer-state", dest="carry_optimizer_state", action="store_false", default=None)
    a("--init", choices=["content", "noise", "gray"])
    a("--preserve-color", action="store_true", default=None,
      help="keep the content's colours (the same as --color luminance)")
    a("--color", choices=["none", "luminance", "histogram"],
      help="luminance: transfer on luminance, keep the content's colours; histogram: give the "
      "styles the content's colour statistics first (default none)")
    a("--style-scale", type=float, help="style size relative to the content (default 1)")
    a("--style-upscale", action="store_true", default=None,
      help="let a style grow past its native size to style-scale x the content (default: cap it)")
    a("--seed", type=int)
    a("--device", help="auto, cpu or cuda:N")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    a("--pooling", choices=["max", "avg"])
    a("--channels-last", choices=["auto", "on", "off"], default="auto")
    a("--weights", default="imagenet", help="imagenet, PATH, caffe:PATH or random (tests only)")
    a("--checkpoint-dir", type=Path, help="write ckpt-s{scale}-i{iter}.pt and a PNG preview here")
    a("--save-every", type=int, help="also checkpoint every N iterations (default: scale ends)")
    a("--max-scales", type=int, help="refuse a schedule of more scales than this (default 16)")
    a("--max-recoveries", type=int,
      help="NaN/Inf recoveries in a row before the run fails as diverged (default 5)")
    a("--resume", type=Path, metavar="CHECKPOINT_FILE", help="continue from a checkpoint")
    a("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    a("--trace", type=Path, metavar="FILE", help="write one JSON line per iteration")
    a("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


_CONFIG_FIELDS = (
    "size", "min_size", "scale_factor", "scales", "iterations", "content_weight", "style_weight",
    "tv_weight", "style_layers", "style_layer_weights", "content_layers", "optimizer", "lr",
    "loss_terms", "style_loss", "ema_decay",
    "lbfgs_history", "lbfgs_max_step", "carry_optimizer_state", "init", "preserve_color", "color",
    "style_scale", "style_upscale", "seed",
    "device", "precision", "pooling", "weights", "save_every", "max_scales", "max_recoveries",
)


def register(subparsers: Any) -> None:
    """Add the `run` and `weights` subcommands to an argparse subparsers object."""
    _add_run(subparsers)
    w = subparsers.add_parser("weights", help="install or inspect the VGG19 weights")
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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

    fields = {k: getattr(args, k) for k in _CONFIG_FIELDS if getattr(args, k, None) is not None}
    if args.style_weights is not None:
        fields["style_blend_weights"] = args.style_weights
    if args.channels_last != "auto":
        fields["channels_last"] = args.channels_last == "on"
    config = TransferConfig(**fields)
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
        result = engine.run(content, styles, config, masks=masks, on_progress=reporter.progress,
                            on_checkpoint=reporter.checkpoint, resume=resume)
    save_image(result.image, out, quality=args.quality)
    meta = result.metadata
    fell = " ".join("-" if r is None or r["loss"] is None else f"{100 * r['loss']:.0f}%"
                    for r in meta["loss_removed"])
    print(f"wrote {out} ({result.image.width}x{result.image.height}, {meta['steps']} steps, "
          f"{meta['seconds']:.1f} s, weights {meta['weights_kind']}; loss removed per scale: {fell})",
          file=sys.stderr)
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
            self.trace.write(json.dumps({
                "scale": p.scale, "size": list(p.size), "iteration": p.iteration, "step": p.step,
                "loss": p.loss, "content_loss": p.content_loss, "style_loss": p.style_loss,
                "tv_loss": p.tv_loss, "seconds": round(p.elapsed, 4), "lr": p.lr,
                "recoveries": p.recoveries, "loss_removed": p.loss_removed,
                "content_removed": p.content_removed, "style_removed": p.style_removed,
                "tv_removed": p.tv_removed,
            }) + "\n")
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
