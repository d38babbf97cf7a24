"""The plan of a submission's jobs: which content, styles and masks (indexes into the form's
images) each job of ``POST /v1/jobs`` (``one_job``) or of a batch (``plan_jobs``) has.
``api.submission`` creates the jobs of a plan.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from api.masks import MaskPlan, check_masks_used, pair_masks
from api.schemas import Pair
from shared.errors import InvalidInput

Plan = list[tuple[int, tuple[int, ...], MaskPlan]]  # (content, style indexes, mask indexes) per job
_PAIRS = TypeAdapter(list[Pair])  # strict: no true/0.0 indexes
PAIRS_SHAPE = (
    "pairs must be a list of [content, style(s)] or [content, style(s), [mask per style]] (integer indexes)"
)


def one_job(n_styles: int, n_masks: int) -> Plan:
    """The plan of ``POST /v1/jobs``: its content with all its styles (and masks, if any)."""
    return [(0, tuple(range(n_styles)), tuple(range(n_masks)) if n_masks else None)]


def plan_jobs(n_contents: int, n_styles: int, mode: str, pairs: Any, max_jobs: int, n_masks: int = 0) -> Plan:
    """The jobs of a batch: every content with every style (``product``) or as ``pairs`` list."""
    if mode not in ("product", "pairs"):
        raise InvalidInput("invalid_mode", "mode must be 'product' or 'pairs'")
    if not n_contents:
        raise InvalidInput("missing_content", "send at least one content image")
    if not n_styles:
        raise InvalidInput("missing_style", "send at least one style image")
    if mode == "product":
        if pairs:
            raise InvalidInput("invalid_pairs", "pairs are only used with mode 'pairs'")
        count = n_contents * n_styles
        if count > max_jobs:
            raise InvalidInput("batch_too_large", f"{count} jobs; the maximum is {max_jobs}")
        check_masks_used(n_masks, mode, [])
        return [(c, (s,), None) for c in range(n_contents) for s in range(n_styles)]
    plan = _pairs_plan(n_contents, n_styles, pairs, max_jobs, n_masks)
    check_masks_used(n_masks, mode, [m for _, _, m in plan])
    return plan


def _pairs_plan(n_contents: int, n_styles: int, pairs: Any, max_jobs: int, n_masks: int) -> Plan:
    try:
        parsed = _PAIRS.validate_python(pairs if pairs is not None else [])
    except ValidationError:
        raise InvalidInput("invalid_pairs", PAIRS_SHAPE) from None
    if not parsed:
        raise InvalidInput("invalid_pairs", "mode 'pairs' needs a non-empty pairs list")
    if len(parsed) > max_jobs:
        raise InvalidInput("batch_too_large", f"{len(parsed)} jobs; the maximum is {max_jobs}")
    plan: Plan = []
    for pair in parsed:
        c, s = pair[0], pair[1]
        styles = (s,) if isinstance(s, int) else tuple(s)
        if not 0 <= c < n_contents or not styles or any(not 0 <= x < n_styles for x in styles):
            raise InvalidInput(
                "invalid_pairs",
                f"pair [{c}, {s}] is out of range: {n_contents} contents, {n_styles} styles",
            )
        plan.append((c, styles, pair_masks(pair, len(styles), n_masks)))
    return plan


__all__ = ["PAIRS_SHAPE", "Plan", "one_job", "plan_jobs"]
