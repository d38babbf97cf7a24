"""What ``make demo`` (deploy/demo.py) shows: the batch in words, its progress lines, the watchdog
that stops it only when nothing moves, and the contact sheet: a row per result (content | style |
result) under column titles, with a caption that says when the results came from random weights
(``execution.random_weights``) or when only some of the batch finished."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.params import JobParams


class DemoError(Exception):
    """A failure with a message for the person running the demo."""


class Stalled(DemoError):
    """The batch stopped making progress (or ran past ``--timeout``)."""


class Watchdog:
    """No deadline while something moves: ``observe`` raises ``Stalled`` only when the state it is
    shown has not changed for ``stall_s`` seconds (or, with ``total_s``, the run is older)."""

    def __init__(
        self, stall_s: float, total_s: float = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stall_s, self.total_s, self.clock = stall_s, total_s, clock
        self.started = self.moved = clock()
        self.state: object = None

    def observe(self, state: object) -> float:
        """Seconds since the state last changed (0 when it just did)."""
        now = self.clock()
        if state != self.state:
            self.state, self.moved = state, now
        quiet = now - self.moved
        if quiet > self.stall_s:
            raise Stalled(f"no job made progress for {quiet:.0f}s (--stall-timeout {self.stall_s:.0f})")
        if self.total_s and now - self.started > self.total_s:
            raise Stalled(f"the batch did not finish within {self.total_s:.0f}s (--timeout)")
        return quiet


def progress_state(jobs: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What moves while a batch runs: each job's status, attempt, step and checkpoints."""
    return tuple(
        (
            j["id"],
            j["status"],
            j.get("attempts"),
            (j.get("progress") or {}).get("step"),
            (j.get("progress") or {}).get("fraction"),
            len(j.get("checkpoints") or []),
        )
        for j in sorted(jobs, key=lambda j: str(j["id"]))
    )


def describe(contents: int, styles: int, params: dict[str, Any]) -> str:
    """The batch in words, from the same params the jobs run with (the scales as the API computes them)."""
    edges = JobParams(**params).long_edges()
    scales = f"{len(edges)} scale{'s' if len(edges) > 1 else ''} ({', '.join(map(str, edges))} px)"
    return (
        f"{contents} contents x {styles} styles = {contents * styles} jobs at {params['size']} px: "
        f"{scales}, {params['iterations']} iterations each"
    )


def progress_line(jobs: list[dict[str, Any]]) -> str:
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("queued", "running", "succeeded")}
    fractions = [float((j.get("progress") or {}).get("fraction") or 0) for j in jobs]
    overall = 100 * sum(fractions) / max(len(jobs), 1)
    running = [j for j in jobs if j["status"] == "running"]
    now = ""
    prog = (running[0].get("progress") or {}) if running else {}
    if prog.get("scales"):
        eta = prog.get("eta_seconds")
        now = (
            f"; now scale {int(prog.get('scale') or 0) + 1}/{prog.get('scales', '?')} "
            f"{100 * float(prog.get('fraction') or 0):.0f}%"
            + (f", eta {eta:.0f}s" if isinstance(eta, (int, float)) else "")
        )
    return (
        f"{overall:5.1f}% of {len(jobs)} jobs: {counts['succeeded']} done, "
        f"{counts['running']} running, {counts['queued']} queued{now}"
    )


RANDOM_WEIGHTS = "RANDOM VGG19 WEIGHTS: this checks the pipeline; it is not a real stylisation"
LINE_H = 14  # px per caption line
RED, BLACK = (200, 0, 0), (0, 0, 0)


def sheet_caption(done: list[dict[str, Any]], total: int) -> list[str]:
    """The lines above the sheet: random weights (read from the jobs themselves), and how many of
    the batch's jobs it shows when not all of them."""
    lines = []
    if any((j.get("execution") or {}).get("random_weights") for j in done):
        lines.append(RANDOM_WEIGHTS)
    if len(done) < total:
        lines.append(f"partial: {len(done)} of {total} jobs finished")
    return lines


def contact_sheet(
    rows: list[tuple[Path, Path, Path]], dest: Path, caption: list[str], cell: int = 200
) -> None:
    """One row per result: content | style | result, each fitted into a ``cell`` square."""
    from PIL import Image, ImageDraw, ImageOps

    pad, label = 8, 16
    top = pad + LINE_H * len(caption) + label  # the caption, then the column titles
    width = 3 * cell + 4 * pad
    sheet = Image.new("RGB", (width, top + len(rows) * (cell + label + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(caption):
        draw.text((pad, pad + i * LINE_H), line, fill=RED if line == RANDOM_WEIGHTS else BLACK)
    for c, title in enumerate(("content", "style", "result")):
        draw.text((pad + c * (cell + pad), top - label + 2), title.upper(), fill=BLACK)
    for r, paths in enumerate(rows):
        y = top + pad + r * (cell + label + pad)
        for c, path in enumerate(paths):
            im = ImageOps.contain(Image.open(path).convert("RGB"), (cell, cell))  # up or down
            x = pad + c * (cell + pad)
            sheet.paste(im, (x + (cell - im.width) // 2, y + label + (cell - im.height) // 2))
            draw.text((x, y + 2), path.stem[:32], fill=BLACK)
    sheet.save(dest)


__all__ = [
    "RANDOM_WEIGHTS",
    "DemoError",
    "Stalled",
    "Watchdog",
    "contact_sheet",
    "describe",
    "progress_line",
    "progress_state",
    "sheet_caption",
]
