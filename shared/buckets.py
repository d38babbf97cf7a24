"""Which jobs can run together in one batch on a GPU (``jobs.bucket``), computed at submission.

A group (``worker.engine.groups.run_group``) runs its jobs in lockstep: one batch of images through
the same scales, iterations and optimiser. Two jobs may share a group when everything that shapes
that computation agrees: the per-scale sizes (their contents' aspect ratios give the same rounded
(w, h) at every scale) and iterations, and every parameter except those the engine keeps per item
(``PER_ITEM``: loss weights, style blend, seed) and those that only shape the output file. The key is
a digest of exactly those, so equal keys are compatible jobs; the worker still checks (the engine
refuses a group whose schedules differ, and the worker then runs those jobs one by one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

from shared.params import JobParams, fit_long_edge

logger = logging.getLogger(__name__)

BUCKET_VERSION = 1  # bump when the engine's notion of "the same computation" changes
# per item in a group (worker.engine.config.BatchItem / GroupJob), or the output file only
PER_ITEM = frozenset(
    {"style_weights", "content_weight", "style_weight", "tv_weight", "seed", "output_format", "quality"}
)


# Common aspect ratios (w / h) and their transposes: a content within SNAP_TOLERANCE of one runs at
# it (JobParams.exact_aspect opts out), so contents of nearly the same shape share a bucket.
CANONICAL_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)
SNAP_TOLERANCE = 0.03  # |log(ratio / canonical)|: about 3 %, at most that much anisotropic scaling


def snapped(wh: tuple[int, int]) -> tuple[int, int]:
    """(w, h) with the nearest common aspect ratio when it is within SNAP_TOLERANCE (the long edge
    kept, the short one moved), else ``wh`` itself."""
    w, h = wh
    ratio = w / h
    best = min(
        (*CANONICAL_RATIOS, *(1 / c for c in CANONICAL_RATIOS)), key=lambda c: abs(math.log(ratio / c))
    )
    if abs(math.log(ratio / best)) > SNAP_TOLERANCE:
        return wh
    return (w, max(1, round(w / best))) if w >= h else (max(1, round(h * best)), h)


def run_size(params: JobParams, content_wh: tuple[int, int]) -> tuple[int, int]:
    """The content's size as the engine sees it: snapped unless the job asked for its exact aspect."""
    return content_wh if params.exact_aspect else snapped(content_wh)


def groupable(params: JobParams) -> bool:
    """fp16 jobs run alone: their dynamic loss scaling is one scale per batch (worker.engine.scaler)."""
    return params.precision != "fp16"


def bucket_key(params: JobParams, content_wh: tuple[int, int]) -> str:
    """The group key of a job with these params whose content is ``content_wh`` (w, h) pixels."""
    shape: dict[str, Any] = {k: v for k, v in params.model_dump(mode="json").items() if k not in PER_ITEM}
    run_wh = run_size(params, content_wh)
    sizes = [fit_long_edge(run_wh, edge) for edge in params.long_edges()]
    blob = json.dumps([BUCKET_VERSION, shape, sizes, params.iterations_per_scale()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


__all__ = [
    "BUCKET_VERSION",
    "CANONICAL_RATIOS",
    "PER_ITEM",
    "bucket_key",
    "groupable",
    "run_size",
    "snapped",
]
