"""The job page's loss curve starts from the worker's bounded history (job.progress["history"]),
with the latest point, and ignores malformed entries a foreign row might hold."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from api.schemas import ProgressOut
from api.web import views


def test_loss_points_are_the_history_then_the_latest_point() -> None:
    job: Any = SimpleNamespace(progress=ProgressOut(scale=1, iteration=20, loss=0.5))
    raw = {"history": [[0, 1, 9.0], [0, 33, 3.0], [1, 1, 2.0], "bad", [1, "x", 1.0], [1, 2]]}
    assert views.loss_points(job, raw) == [[0, 1, 9.0], [0, 33, 3.0], [1, 1, 2.0], [1, 20, 0.5]]
    assert views.loss_points(job, {}) == [[1, 20, 0.5]]
