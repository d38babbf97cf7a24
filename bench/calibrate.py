"""Loss-weight calibration sweep: style weight x style-layer weights x TV weight (a script, not a test).

    # the first run with the real ImageNet weights (on a GPU: minutes)
    python bench/calibrate.py --device cuda
    # offline check that the script works (random weights, tiny; the figures mean nothing)
    python bench/calibrate.py --weights random --size 48 --ratios 3,10 --tv 0 --out /tmp/calib

The content weight is fixed at 1, so ``--ratios`` lists style weights, i.e. style:content ratios (the
objective is normalised per scale, so only ratios matter). ``--terms relative`` (the engine's default,
config.RELATIVE_PRESET: style 10, tv 0.01) sweeps style 0.3-100 around the preset's 10, the range the
derivation in config.py allows; ``--terms raw`` sweeps the unnormalised terms, 1e3-1e8 around the old
torchvision preset's 1e6 (config.RAW_PRESETS). ``--layer-weights``: ``equal`` (Gatys, jcjohnson),
``decaying`` (crowsonkb: [256, 64, 16, 4, 1] / 341, the relative default) or ``both``. ``--tv``: TV
weights (relative: 1 = as rough as the content; default 0, 0.01, 0.1).

Every combination is one job with the same seed, content and style. Written under ``--out``: one PNG
per job, ``contact_sheet.png`` (rows = layer weights x tv, columns = style weight), ``summary.json``
(every job's metadata) and ``summary.csv``; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from worker.engine import Progress, StyleTransfer, TransferConfig, save_image  # noqa: E402
from worker.engine.config import DEFAULT_STYLE_LAYERS  # noqa: E402

IMAGES = ROOT / "examples" / "images"
CONTENT = IMAGES / "content_chelsea_cat.png"
STYLE = IMAGES / "style_hokusai_great_wave.jpg"
# per --terms: (style weights, TV weights). Relative TV is tv(x) / tv(content): 0.01 a light touch,
# 0.1 a visible smoothing. Raw TV is the mean squared neighbour difference of the [0, 1] image (~1e-3
# for a photograph) against a raw content term of order 1 at relu4_2.
GRIDS = {"relative": ("0.3,1,3,10,30,100", "0,0.01,0.1"), "raw": ("1e3,1e4,1e5,1e6,1e7,1e8", "0,10,1000")}
LAYER_WEIGHTS: dict[str, tuple[float, ...]] = {
    "equal": tuple(1.0 for _ in DEFAULT_STYLE_LAYERS),
    "decaying": TransferConfig().layer_weights(),  # crowsonkb: [256, 64, 16, 4, 1] / 341
}
# random weights only check that the script runs: a short fixed schedule keeps that to ~a minute on
# the 2-core CPU (auto gives 400 iterations even at 48 px)
RANDOM_ITERATIONS = 40
MIN_CELL = 160  # px: small outputs are enlarged (nearest) so the labels fit


@dataclass
class Case:
    style_weight: float
    layer_weights: str
    tv_weight: float
    name: str = ""
    image: Path | None = None
    row: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from e
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"need finite numbers >= 0: {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", default="imagenet", help="imagenet (default), a file, or random")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--size", type=int, default=512, help="output long edge (default 512)")
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"per scale (default: the engine's auto; {RANDOM_ITERATIONS} with random weights)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--content", type=Path, default=CONTENT)
    p.add_argument("--style", type=Path, default=STYLE)
    p.add_argument(
        "--terms",
        choices=list(GRIDS),
        default="relative",
        help="relative (the engine's default) or raw loss terms",
    )
    p.add_argument(
        "--ratios",
        type=float_list,
        default=None,
        help="style weights with content weight 1 (default: relative "
        f"{GRIDS['relative'][0]}; raw {GRIDS['raw'][0]})",
    )
    p.add_argument("--layer-weights", choices=["equal", "decaying", "both"], default="both")
    p.add_argument(
        "--tv",
        type=float_list,
        default=None,
        help=f"TV weights (default: relative {GRIDS['relative'][1]}; raw {GRIDS['raw'][1]})",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "calibrate")
    args = p.parse_args(argv)
    ratios, tvs = GRIDS[args.terms]
    args.ratios = args.ratios if args.ratios is not None else float_list(ratios)
    args.tv = args.tv if args.tv is not None else float_list(tvs)
    for name in ("content", "style"):
        if not getattr(args, name).is_file():
            p.error(f"--{name} {getattr(args, name)} does not exist")
    return args


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-") if abs(v) >= 1e3 or abs(v) < 1e-2 else f"{v:g}"


def run_case(engine: StyleTransfer, args: argparse.Namespace, case: Case) -> None:
    last: list[Progress] = []

    def on_progress(p: Progress) -> None:
        last[:] = [p]

    config = TransferConfig(
        size=args.size,
        min_size=min(128, args.size),
        iterations=args.iterations,
        seed=args.seed,
        content_weight=1.0,
        style_weight=case.style_weight,
        tv_weight=case.tv_weight,
        style_layer_weights=LAYER_WEIGHTS[case.layer_weights],
        loss_terms=args.terms,
    )
    result = engine.run(str(args.content), [str(args.style)], config, on_progress=on_progress)
    case.name = f"sw{fmt(case.style_weight)}_{case.layer_weights}_tv{fmt(case.tv_weight)}"
    case.image = args.out / f"{case.name}.png"
    save_image(result.image, case.image)
    meta = result.metadata
    final = last[0] if last else None
    removed = [r.get("loss") if r else None for r in meta["loss_removed"]]
    case.metadata = meta
    case.row = {
        "name": case.name,
        "style_weight": case.style_weight,
        "layer_weights": case.layer_weights,
        "tv_weight": case.tv_weight,
        "seconds": meta["seconds"],
        "steps": meta["steps"],
        "final_loss": final.loss if final else None,
        "content_loss": final.content_loss if final else None,
        "style_loss": final.style_loss if final else None,
        "tv_loss": final.tv_loss if final else None,
        "loss_removed": removed,
        "image": case.image.name,
    }


def contact_sheet(cases: list[Case], ratios: list[float], rows: list[tuple[str, float]], path: Path) -> None:
    """Grid: one row per (layer weights, tv), one column per style weight; a label under each cell."""
    font = ImageFont.load_default()
    images = {(c.layer_weights, c.tv_weight, c.style_weight): Image.open(c.image) for c in cases if c.image}
    cw = max(MIN_CELL, *(im.width for im in images.values()))
    ch = max(im.height * cw // im.width for im in images.values())
    label_h, pad = 26, 4
    sheet = Image.new(
        "RGB", (len(ratios) * (cw + pad) + pad, len(rows) * (ch + label_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for r, (lw, tv) in enumerate(rows):
        for c, sw in enumerate(ratios):
            x, y = pad + c * (cw + pad), pad + r * (ch + label_h + pad)
            im = images.get((lw, tv, sw))
            if im is None:
                continue
            im = im.convert("RGB").resize(
                (cw, im.height * cw // im.width),
                Image.Resampling.NEAREST if im.width < cw else Image.Resampling.LANCZOS,
            )
            sheet.paste(im, (x, y))
            case = next(k for k in cases if (k.layer_weights, k.tv_weight, k.style_weight) == (lw, tv, sw))
            loss = case.row.get("final_loss")
            draw.text((x + 2, y + ch + 1), f"style {fmt(sw)}  {lw}  tv {fmt(tv)}", fill="black", font=font)
            draw.text(
                (x + 2, y + ch + 13),
                f"loss {loss:.3g}  {case.row['seconds']:.1f}s" if loss is not None else "",
                fill="dimgray",
                font=font,
            )
    sheet.save(path)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = [
        "style_w",
        "layers",
        "tv_w",
        "seconds",
        "final_loss",
        "content",
        "style",
        "tv",
        "loss_removed per scale",
    ]
    table = [head] + [
        [
            fmt(r["style_weight"]),
            r["layer_weights"],
            fmt(r["tv_weight"]),
            f"{r['seconds']:.1f}",
            *(
                f"{r[k]:.4g}" if r[k] is not None else "-"
                for k in ("final_loss", "content_loss", "style_loss", "tv_loss")
            ),
            " ".join(f"{v:.3f}" if v is not None else "-" for v in r["loss_removed"]),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    layer_choices = ["equal", "decaying"] if args.layer_weights == "both" else [args.layer_weights]
    rows = list(itertools.product(layer_choices, args.tv))
    cases = [Case(sw, lw, tv) for lw, tv in rows for sw in args.ratios]
    engine = StyleTransfer(weights=args.weights, device=args.device, seed=args.seed)
    kind = engine.load_weights().kind
    if kind == "random":
        print("WARNING: random VGG19 weights: this checks the script runs; figures are for the real weights")
    if kind == "random" and args.iterations is None:
        args.iterations = RANDOM_ITERATIONS
        print(f"random weights: {RANDOM_ITERATIONS} iterations per scale (give --iterations to change)")
    preset = TransferConfig(loss_terms=args.terms).loss_weights(kind)
    print(
        f"weights {args.weights} ({kind}); {args.terms} terms, preset {preset}; content weight 1; "
        f"{len(cases)} jobs at "
        f"{args.size} px -> {args.out}"
    )
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        run_case(engine, args, case)
        print(
            f"[{i}/{len(cases)}] {case.name}: {case.row['seconds']:.1f}s, "
            f"final loss {case.row['final_loss']:.4g}",
            flush=True,
        )
    sheet = args.out / "contact_sheet.png"
    contact_sheet(cases, args.ratios, rows, sheet)
    summary = {
        "weights": args.weights,
        "weights_kind": kind,
        "device": cases[0].metadata.get("device"),
        "size": args.size,
        "content": str(args.content),
        "style": str(args.style),
        "content_weight": 1.0,
        "terms": args.terms,
        "layer_weights": {k: LAYER_WEIGHTS[k] for k in layer_choices},
        "seconds_total": round(time.perf_counter() - t0, 3),
        "jobs": [{**c.row, "metadata": c.metadata} for c in cases],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cases[0].row))
        writer.writeheader()
        for c in cases:
            writer.writerow(
                {
                    **c.row,
                    "loss_removed": " ".join(
                        f"{v:.4f}" if v is not None else "" for v in c.row["loss_removed"]
                    ),
                }
            )
    print_table([c.row for c in cases])
    print(f"contact sheet {sheet}; summary {args.out / 'summary.json'}, {args.out / 'summary.csv'}")
    if kind == "random":
        print("WARNING: random weights: figures are for the real weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
