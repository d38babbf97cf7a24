"""Job states, engine parameters and settings: plain data, no servers."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING

import pytest
from pydantic import ValidationError

from shared.jobs import TERMINAL, InvalidTransition, JobStatus, check_transition, sources_for
from shared.params import JobParams

if TYPE_CHECKING:
    from shared.settings import Settings


@pytest.mark.parametrize("terminal", sorted(TERMINAL, key=attrgetter("value")))
def test_terminal_states_never_change(terminal: JobStatus) -> None:
    for new in JobStatus:
        with pytest.raises(InvalidTransition):
            check_transition(terminal, new)


def test_allowed_transitions() -> None:
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.QUEUED)  # given back on shutdown
    with pytest.raises(InvalidTransition):
        check_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)
    assert sources_for(JobStatus.CANCELED) == {JobStatus.QUEUED, JobStatus.RUNNING}
    assert sources_for(JobStatus.SUCCEEDED) == {JobStatus.RUNNING}


def test_params_defaults_and_scale_count() -> None:
    p = JobParams()
    assert (p.size, p.min_size, p.optimizer) == (512, 128, "lbfgs")
    assert p.scale_count() == 5  # 128, 181, 256, 362, 512
    assert JobParams(size=128, min_size=128).scale_count() == 1
    assert JobParams(size=64, min_size=32, scale_factor=2).scale_count() == 2
    assert JobParams(scales=[64, 96, 128], size=128).scale_count() == 3


def test_params_total_iterations() -> None:
    assert JobParams(iterations=10).total_iterations() == 50
    assert JobParams(size=64, min_size=32, scale_factor=2, iterations=[5, 7]).total_iterations() == 12
    assert JobParams().iterations_per_scale() == [317, 209, 138, 91, 60]


@pytest.mark.parametrize(
    "bad",
    [
        {"sizee": 512},  # unknown key: a typo must not be a silent default
        {"size": 8},
        {"min_size": 600},
        {"iterations": 0},
        {"iterations": [10, 10]},  # 2 values for 5 scales
        {"style_weights": [-1, 2]},
        {"optimizer": "sgd"},
        {"output_format": "gif"},
    ],
)
def test_params_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        JobParams(**bad)


def test_settings_embedded_default(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory()
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("stylequeue.db")
    assert s.broker_url.startswith("sqla+sqlite:///") and s.embedded
    assert s.storage_url.startswith("file:///")
    assert s.auth == "on"  # never off by default


def test_settings_production(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory(
        database_url="postgresql+psycopg://u@db/x",
        broker_url="redis://r:6379/0",
        storage_url="s3://bucket/p",
    )
    assert not s.embedded and s.storage_url == "s3://bucket/p"


def test_color_reaches_the_engine_and_contradictions_are_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from shared.settings import Settings
    from worker.config import transfer_config

    cfg = transfer_config(JobParams(color="histogram", style_upscale=True, lbfgs_max_step=0.5), Settings())
    assert (cfg.color, cfg.style_upscale, cfg.lbfgs_max_step) == ("histogram", True, 0.5)
    assert transfer_config(JobParams(preserve_color=True), Settings()).color == "luminance"
    with pytest.raises(ValidationError):
        JobParams(preserve_color=True, color="histogram")


def test_fidelity_params_reach_the_engine_and_are_bounded() -> None:
    import pytest
    from pydantic import ValidationError

    from shared.params import W2_WORK_PER_ITERATION
    from shared.settings import Settings
    from worker.config import transfer_config

    cfg = transfer_config(
        JobParams(loss_terms="raw", style_loss="w2", optimizer="adam", ema_decay=0.9), Settings()
    )
    assert (cfg.loss_terms, cfg.style_loss, cfg.optimizer, cfg.ema_decay) == ("raw", "w2", "adam", 0.9)
    default = transfer_config(JobParams(), Settings())
    assert (default.loss_terms, default.style_loss, default.ema_decay) == ("relative", "gram", 0.99)
    for bad in ({"ema_decay": 1}, {"ema_decay": -0.1}, {"style_loss": "l2"}, {"loss_terms": "energy"}):
        with pytest.raises(ValidationError):
            JobParams(**bad)
    # Adam's own schedule, and W2's per-iteration cost, count in the job's work
    adam = JobParams(optimizer="adam")
    assert adam.iterations_per_scale() == [1000, 500, 500, 500, 500]
    big = JobParams(optimizer="adam", size=2048)  # the largest default job fits the work limit
    assert big.iterations_per_scale()[-4:] == [354, 250, 177, 125]
    assert big.work() < Settings().max_job_work
    w2 = JobParams(style_loss="w2", iterations=10)
    assert w2.work() == JobParams(iterations=10).work() + 50 * W2_WORK_PER_ITERATION
    assert w2.work(regions=4) == JobParams(iterations=10).work() + 4 * 50 * W2_WORK_PER_ITERATION
