"""A job's loss curve, bounded: what ``job.progress["history"]`` keeps for the web page's plot.

Every iteration's loss would be thousands of points rewritten with each progress write, so each scale
keeps at most ``PER_SCALE`` evenly spaced points: points are taken every ``stride`` iterations, and
when a scale's list is full every other point is dropped and the stride doubles. The curve covers
this attempt (a resumed job's points start at its resume step).
"""

from __future__ import annotations

import math
import threading

PER_SCALE = 64  # points kept per scale: ~2 KB of JSON per scale in each progress write


class LossHistory:
    def __init__(self, per_scale: int = PER_SCALE) -> None:
        self.per_scale = per_scale
        self._points: dict[int, list[list[float]]] = {}  # scale -> [[scale, iteration, loss], ...]
        self._stride: dict[int, int] = {}
        self._first: dict[int, int] = {}  # a scale's first iteration seen: the points' origin
        self._lock = threading.Lock()  # added to from the engine's thread, read from the watcher's

    def add(self, scale: int, iteration: int, loss: float | None) -> None:
        if loss is None or not math.isfinite(loss):
            return  # a step the NaN guard undid: no point
        with self._lock:
            stride = self._stride.setdefault(scale, 1)
            first = self._first.setdefault(scale, iteration)
            if (iteration - first) % stride:
                return
            points = self._points.setdefault(scale, [])
            points.append([scale, iteration, round(float(loss), 6)])
            if len(points) > self.per_scale:  # full: keep every other point, take half as many
                stride *= 2
                self._stride[scale] = stride
                self._points[scale] = [q for q in points if (int(q[1]) - first) % stride == 0]

    def points(self) -> list[list[float]]:
        """Every scale's points, in order (a copy)."""
        with self._lock:
            return [list(p) for scale in sorted(self._points) for p in self._points[scale]]


__all__ = ["PER_SCALE", "LossHistory"]
