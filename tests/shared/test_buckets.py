"""Bucket keys: equal exactly when two jobs can share a GPU batch (the same computation)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.buckets import PER_ITEM, bucket_key, snapped
from shared.params import JobParams


def key(wh: tuple[int, int] = (640, 480), **params: Any) -> str:
    return bucket_key(JobParams(**params), wh)


def test_per_item_values_do_not_split_a_bucket() -> None:
    base = key()
    assert key(style_weight=3.0, content_weight=0.5, tv_weight=0.0, seed=7) == base
    assert key(style_weights=[1, 2], output_format="jpeg", quality=80) == base
    assert set(JobParams.model_fields) >= PER_ITEM  # no stale names


@pytest.mark.parametrize(
    "change",
    [
        {"size": 256},
        {"min_size": 256},
        {"iterations": 30},
        {"optimizer": "adam"},
        {"lr": 0.5},
        {"pooling": "avg"},
        {"precision": "fp32"},
        {"init": "noise"},
        {"color": "luminance"},
        {"style_scale": 0.5},
        {"loss_terms": "raw"},
        {"style_loss": "w2"},
    ],
)
def test_what_shapes_the_computation_splits_it(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_contents_share_a_bucket_when_every_scale_has_the_same_size() -> None:
    assert key((640, 480)) == key((1280, 960)) == key((641, 481))  # 4:3 at every scale
    assert key((640, 480)) != key((480, 640))  # portrait
    assert key((640, 480)) != key((640, 360))  # 16:9


def test_nearly_common_aspect_ratios_snap_to_it() -> None:
    assert snapped((650, 480)) == (650, 488)  # 1.354 -> 4:3 (1.6 % off), the long edge kept
    assert snapped((480, 650)) == (488, 650)
    assert snapped((1920, 1080)) == (1920, 1080)  # 16:9 already
    assert snapped((700, 480)) == (700, 467)  # 1.458: 2.8 % from 3:2
    assert snapped((700, 500)) == (700, 500)  # 1.4: 5 % from 4:3, 7 % from 3:2: kept
    assert snapped((370, 100)) == (370, 100)  # 3.7:1 is no common ratio: kept
    assert key((650, 480)) == key((640, 480))  # so they share a bucket
    assert key((650, 480), exact_aspect=True) != key((640, 480), exact_aspect=True)
