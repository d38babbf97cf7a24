"""worker.loss_history: a bounded, evenly spaced loss curve per scale for job.progress["history"]."""

from __future__ import annotations

import math

from worker.loss_history import LossHistory


def test_each_scale_keeps_at_most_its_points_evenly_spaced_from_the_start() -> None:
    h = LossHistory(per_scale=8)
    for it in range(1, 501):
        h.add(0, it, 1000.0 / it)
    for it in range(1, 11):
        h.add(1, it, float(it))
    points = h.points()
    first = [p for p in points if p[0] == 0]
    assert 4 <= len(first) <= 8  # bounded, whatever the iterations
    gaps = {b[1] - a[1] for a, b in zip(first, first[1:], strict=False)}
    assert len(gaps) == 1  # evenly spaced
    assert first[0][1] == 1 and first[-1][1] >= 500 - 128  # spans the scale from its start
    assert [p[1] for p in points if p[0] == 1] == [1, 3, 5, 7, 9]  # its own stride (doubled once)
    assert [p[0] for p in points] == sorted(p[0] for p in points)


def test_non_finite_losses_leave_no_point() -> None:
    h = LossHistory()
    h.add(0, 1, math.nan)
    h.add(0, 2, None)
    h.add(0, 3, math.inf)
    h.add(0, 4, 2.5)
    assert h.points() == [[0, 4, 2.5]]
