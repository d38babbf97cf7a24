"""JobParams: ``min_size`` follows a smaller ``size`` when not given, as ``stylequeue run`` does."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.params import DEFAULT_MIN_SIZE, JobParams


@pytest.mark.parametrize(
    ("size", "min_size", "edges"),
    [(96, 96, [96]), (16, 16, [16]), (127, 127, [127]), (128, 128, [128]), (256, 128, [128, 181, 256])],
)
def test_min_size_follows_a_smaller_size_when_not_given(size: int, min_size: int, edges: list[int]) -> None:
    params = JobParams(size=size)
    assert (params.min_size, params.long_edges()) == (min_size, edges)
    assert params.model_dump()["min_size"] == min_size  # what the job row stores and the worker runs
    assert JobParams.model_validate(params.model_dump()) == params  # the stored dump reads back


def test_a_given_min_size_is_kept_and_one_above_size_is_refused() -> None:
    assert JobParams(size=96, min_size=48, scale_factor=2).long_edges() == [48, 96]
    assert JobParams(size=96, min_size=96).long_edges() == [96]
    for given in ({"size": 96, "min_size": DEFAULT_MIN_SIZE}, {"min_size": 600}):
        with pytest.raises(ValidationError) as caught:
            JobParams(**given)
        (err,) = caught.value.errors()
        assert err["loc"] == ("min_size",), err  # names the parameter the client gave
        assert "must not exceed size" in err["msg"]


def test_the_schema_says_what_min_size_defaults_to() -> None:
    described = JobParams.model_json_schema()["properties"]["min_size"]["description"]
    assert str(DEFAULT_MIN_SIZE) in described and "size if size is smaller" in described
