"""Hostile values against the live API (hypothesis): never a 5xx, JSON errors, nothing created.

Each test draws a few hundred requests from one strategy of ``tests.api.hostile.hostile`` (raw bytes:
``params`` with NaN / 1e400 / 5000-digit integers / 2000-deep nesting / NUL / lone surrogates, JSON
and multipart batch bodies, path ids, ``?status=``, ``?batch_id=``, ``?cursor=``) and checks every
answer with ``Fuzzer``: status < 500, no timeout, a 4xx body ``{"error": {"code", "message"}}``, row
and object counts unchanged by a rejected request, no image of another tenant accepted, no object of
A's readable by B. Failures are collected (no shrinking) and reported together, by class, each with
its smallest request and the exception class the API logged. Derandomized: the same run every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import strategies as st

from tests.api.hostile.hostile import (
    Fuzzer,
    HealthWatch,
    Ids,
    Probe,
    batch_form_probes,
    batch_json_probes,
    huge_list_probes,
    params_probes,
    params_seed_probes,
    path_probes,
    query_probes,
    scale_factor_probes,
)
from tests.support.live import LiveApi

pytestmark = pytest.mark.slow

EXAMPLES = 200
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # failures are collected, so nothing to shrink
    suppress_health_check=list(HealthCheck),
    verbosity=Verbosity.quiet,
)


@pytest.fixture
def fuzzer(live_api: LiveApi) -> Iterator[Fuzzer]:
    live_api.ensure_alive()
    f = Fuzzer(live_api)
    yield f
    f.close()


def fuzz(
    fuzzer: Fuzzer,
    strategy: st.SearchStrategy[Probe],
    examples: int = EXAMPLES,
    explicit: list[Probe] | None = None,
) -> None:
    """``examples`` drawn probes (after the ``explicit`` ones), all judged by ``fuzzer``."""

    def run(probe: Probe) -> None:
        fuzzer.send(probe)

    for probe in reversed(explicit or []):
        run = example(probe)(run)
    settings(PROFILE, max_examples=examples)(given(strategy)(run))()
    if fuzzer.failures or fuzzer.sent < examples // 2:
        pytest.fail(fuzzer.report() + "\n\n" + fuzzer.api.log_tail(40), pytrace=False)


def test_params_json_values(live_api: LiveApi, fuzzer: Fuzzer) -> None:
    ids = Ids.of(live_api)
    fuzz(fuzzer, params_probes(ids), 300, explicit=params_seed_probes(ids))


def test_batch_json_bodies(live_api: LiveApi, fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, batch_json_probes(Ids.of(live_api)))


def test_form_ids(live_api: LiveApi, fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, batch_form_probes(Ids.of(live_api)), 150)


def test_path_ids(live_api: LiveApi, fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, path_probes(Ids.of(live_api)))


def test_list_queries(live_api: LiveApi, fuzzer: Fuzzer) -> None:
    fuzz(fuzzer, query_probes(Ids.of(live_api)))


BLOCK_LIMIT_S = 1.0


def test_scale_factor_near_one_does_not_freeze(live_api: LiveApi) -> None:
    """Review finding 1: a scale factor just above 1 made the scale-count loop run for ever (or for
    seconds) inside the event loop. Each request must be answered within 5 s, and ``/healthz`` must
    keep answering within 1 s while it is processed."""
    fuzzer = Fuzzer(live_api, timeout=5.0)
    try:
        for probe in scale_factor_probes(Ids.of(live_api)):
            with HealthWatch(live_api, timeout=5.0) as watch:
                fuzzer.send(probe)
            if watch.worst > BLOCK_LIMIT_S:
                fuzzer.record(
                    probe,
                    "healthz",
                    f"blocked the event loop ({probe.what})",
                    f"/healthz waited {watch.worst:.1f}s while this request ran",
                )
            live_api.ensure_alive()
    finally:
        fuzzer.close()
    if fuzzer.failures:
        pytest.fail(fuzzer.report(), pytrace=False)


def test_huge_id_list(live_api: LiveApi) -> None:
    """70,000 ids in one JSON batch: a 4xx (too large, or unknown images), not a (false) 5xx."""
    fuzzer = Fuzzer(live_api, timeout=30.0)
    try:
        for probe in huge_list_probes(Ids.of(live_api)):
            fuzzer.send(probe)
    finally:
        fuzzer.close()
    if fuzzer.failures:
        pytest.fail(fuzzer.report(), pytrace=False)
