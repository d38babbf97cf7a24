"""Spatial control (Gatys et al. 2017): one content mask per style, checked before anything is stored.

A mask is a greyscale image over the content (white: its style applies here, black: it does not;
read as luminance in [0, 1] and resized to the content by the engine). A job either has no masks or
exactly one per style, in the order of its styles; each mask must have the content's aspect ratio.
Masks are stored and owned like every other image (``api.imagestore``): only the counts and shapes
are checked here, from the sizes the API already knows (upload headers, stored rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shared.errors import InvalidInput

# Mirrors the engine's check (worker/engine, EngineError "invalid_mask"): a mask is accepted when
# abs(log((w_m / h_m) / (w_c / h_c))) <= MASK_ASPECT_TOLERANCE, i.e. its aspect ratio is within about
# 2 % of the content's. Keep the two equal, or the API accepts jobs the worker then fails.
MASK_ASPECT_TOLERANCE = 0.02
MASK_MIN_SIDE = 16  # the usual image minimum (shared.imagecheck) applies to masks too

Size = tuple[int, int]  # (width, height)
MaskPlan = tuple[int, ...] | None  # a job's indexes into the batch's masks, one per style; or none


def check_mask_count(n_masks: int, n_styles: int, where: str = "the job") -> None:
    """No masks, or exactly one per style (``mask_count_mismatch``)."""
    if n_masks and n_masks != n_styles:
        raise InvalidInput(
            "mask_count_mismatch",
            f"{where} has {n_styles} style(s) and {n_masks} mask(s): give one mask per style, in "
            "the order of the styles, or none",
        )


def aspect_matches(mask: Size, content: Size) -> bool:
    (wm, hm), (wc, hc) = mask, content
    return abs(math.log((wm / hm) / (wc / hc))) <= MASK_ASPECT_TOLERANCE


def check_mask_shapes(content: Size, masks: Sequence[tuple[str, Size]]) -> None:
    """Each ``(label, size)`` mask has the content's aspect ratio (``mask_shape_mismatch``)."""
    for label, size in masks:
        w, h = size
        if min(w, h) < MASK_MIN_SIDE:
            raise InvalidInput(
                "too_small", f"{label} is {w}x{h}; a mask needs at least {MASK_MIN_SIDE} px on each side"
            )
        if not aspect_matches(size, content):
            raise InvalidInput(
                "mask_shape_mismatch",
                f"{label} is {w}x{h} (aspect {w / h:.3f}) but its content is {content[0]}x"
                f"{content[1]} (aspect {content[0] / content[1]:.3f}): a mask must have the "
                f"content's aspect ratio (within {MASK_ASPECT_TOLERANCE:.0%}); it is resized to "
                "the content",
            )


def check_job_masks(dims: Mapping[str, Size], content_id: str, mask_ids: Sequence[str]) -> None:
    """The masks of a single job (``POST /v1/jobs``), named as their form fields."""
    check_mask_shapes(dims[content_id], [(f"mask[{i}]", dims[m]) for i, m in enumerate(mask_ids)])


def pair_masks(pair: Sequence[Any], n_styles: int, n_masks: int) -> MaskPlan:
    """The mask indexes of one batch pair: its optional third element, one index per style."""
    if len(pair) < 3:
        return None
    masks = tuple(pair[2])
    shown = f"[{pair[0]}, {pair[1]}, {list(masks)}]"[:200]
    if not masks:
        raise InvalidInput(
            "mask_count_mismatch",
            f"pair {shown} has an empty mask list: give "
            "one mask index per style, or leave the third element out",
        )
    check_mask_count(len(masks), n_styles, f"pair {shown}")
    if any(not 0 <= m < n_masks for m in masks):
        raise InvalidInput("invalid_pairs", f"pair {shown}: a mask index is out of range: {n_masks} masks")
    return masks


def check_masks_used(n_masks: int, mode: str, plans: Sequence[MaskPlan]) -> None:
    """Masks belong to a (content, styles) pair: a batch that sends masks must name them in pairs."""
    if not n_masks:
        return
    if mode != "pairs":
        raise InvalidInput(
            "masks_need_pairs",
            "masks are given per pair: use mode 'pairs' and "
            "give each pair's mask indexes as its third element",
        )
    if all(p is None for p in plans):
        raise InvalidInput(
            "masks_need_pairs",
            f"{n_masks} mask(s) but no pair names one: give "
            "each pair's mask indexes as its third element, [content, styles, "
            "masks]",
        )


def check_batch_masks(
    dims: Mapping[str, Size],
    content_ids: Sequence[str],
    mask_ids: Sequence[str],
    plan: Sequence[tuple[int, tuple[int, ...], MaskPlan]],
) -> None:
    """Every masked job of a batch: each of its masks against its content."""
    for j, (c, _, masks) in enumerate(plan):
        if masks is not None:
            check_mask_shapes(
                dims[content_ids[c]],
                [(f"masks[{m}] (pair {j}, style {k})", dims[mask_ids[m]]) for k, m in enumerate(masks)],
            )


__all__ = [
    "MASK_ASPECT_TOLERANCE",
    "MASK_MIN_SIDE",
    "MaskPlan",
    "aspect_matches",
    "check_batch_masks",
    "check_job_masks",
    "check_mask_count",
    "check_mask_shapes",
    "check_masks_used",
    "pair_masks",
]
