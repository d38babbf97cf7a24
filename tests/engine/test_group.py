"""A group of independent jobs in one batch (engine.groups.run_group): each item ends as a run of it
alone does, whatever else is in the group, and is stopped, recovered, failed and checkpointed alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from PIL import Image

from worker.engine import BatchItem, Checkpoint, EngineError, Progress, StyleTransfer
from worker.engine import objective as objective_mod
from worker.engine.batched_lbfgs import BatchedLBFGS, two_loop_direction
from worker.engine.diagnostics import HostReads
from worker.engine.group import GroupPyramid
from worker.engine.groups import GroupJob, GroupOutcome, run_group
from worker.engine.readback import PinnedReadback
from worker.engine.vgg import VGGFeatures

from .conftest import small_config
from .groupkit import alone, gap, jobs, ok

__all__ = ["jobs"]  # the fixture


class Stop(Exception):
    """What a worker's callback raises to stop its job (JobStopped)."""


def test_a_group_with_adam_gives_each_job_its_own_result(engine: StyleTransfer, jobs: list[GroupJob]) -> None:
    cfg = small_config(optimizer="adam", init="noise")
    outcomes = run_group(engine, jobs, cfg)
    for job, outcome in zip(jobs, outcomes, strict=True):
        single = alone(engine, job, cfg)
        assert gap(ok(outcome), single.tensor) < 2e-6  # float rounding only (groupkit.gap)
        assert (ok(outcome) - single.tensor).abs().max() < 1e-3
        assert outcome.result is not None
        assert outcome.result.metadata["config_digest"] == single.metadata["config_digest"]
        assert outcome.result.metadata["group_size"] == 3
    assert (ok(outcomes[0]) - ok(outcomes[2])).abs().max() > 0.01  # they really differ


def test_a_group_with_lbfgs_follows_each_single_run(engine: StyleTransfer, jobs: list[GroupJob]) -> None:
    """Per-item L-BFGS: each item's losses follow its single run (torch's L-BFGS) step for step;
    L-BFGS amplifies rounding over steps, so the images agree closely, not bit for bit."""
    cfg = small_config(optimizer="lbfgs")
    seen: list[list[Progress]] = [[] for _ in jobs]
    grouped = [replace(j, on_progress=seen[i].append) for i, j in enumerate(jobs)]
    outcomes = run_group(engine, grouped, cfg)
    for i, (job, outcome) in enumerate(zip(jobs, outcomes, strict=True)):
        by_itself: list[Progress] = []
        single = alone(engine, job, cfg, on_progress=by_itself.append)
        assert [p.step for p in seen[i]] == [p.step for p in by_itself] == list(range(1, 9))
        for p, q in zip(seen[i], by_itself, strict=True):
            assert p.loss == pytest.approx(q.loss, rel=1e-3), (i, p.step)
        assert (ok(outcome) - single.tensor).abs().mean() < 1e-3


def test_the_solved_lbfgs_direction_is_the_two_loop_recursion(
    engine: StyleTransfer, jobs: list[GroupJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every step of a group (items with different histories, one reset by a NaN, a ring of 3
    that wraps), the solved form (an option, batched_lbfgs.py) gives torch's two-loop direction to
    float rounding, and a group run with it completes every item."""
    gaps: list[float] = []

    def both(self: BatchedLBFGS, g: torch.Tensor) -> torch.Tensor:
        d, ref = self.solved_direction(g), two_loop_direction(self, g)
        gaps.append(float(((d - ref).norm(dim=1) / ref.norm(dim=1)).max()))
        return ref

    cfg = small_config(optimizer="lbfgs", init="noise", lbfgs_history=3, iterations=6)
    solved = run_group(engine, jobs, cfg, lbfgs_solved=True)
    assert all(o.error is None for o in solved)
    monkeypatch.setattr(BatchedLBFGS, "direction", both)
    _poison(monkeypatch, 2, lambda n: n == 4)  # item 2 restarts its history at its 4th step
    outcomes = run_group(engine, jobs, cfg)
    assert all(o.error is None for o in outcomes)
    assert len(gaps) == 12 and max(gaps) < 1e-4, gaps


def test_a_canceled_item_leaves_the_others_unchanged_and_the_batch_shrinks(
    engine: StyleTransfer, jobs: list[GroupJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_sizes: list[int] = []
    forward = VGGFeatures.forward

    def spy(self: VGGFeatures, x: torch.Tensor, wanted: frozenset[int]) -> dict[int, torch.Tensor]:
        if x.requires_grad:  # the optimised images, not a target pass
            batch_sizes.append(int(x.shape[0]))
        return forward(self, x, wanted)

    def cancel_at_2(p: Progress) -> None:
        if p.step >= 2:
            raise Stop("canceled")

    cfg = small_config(optimizer="adam", init="noise")
    clean = run_group(engine, jobs, cfg)
    monkeypatch.setattr(VGGFeatures, "forward", spy)
    stopped = run_group(engine, [jobs[0], replace(jobs[1], on_progress=cancel_at_2), jobs[2]], cfg)
    assert isinstance(stopped[1].error, Stop) and stopped[1].result is None
    for i in (0, 2):
        assert torch.equal(ok(stopped[i]), ok(clean[i]))  # masked out: bit for bit the same
    assert batch_sizes == [3] * 4 + [2] * 4  # dropped at the next scale boundary


def _poison(monkeypatch: pytest.MonkeyPatch, item: int, steps: Callable[[int], bool]) -> None:
    """Make ``item``'s loss NaN at the evaluations ``steps`` picks (1-based call count)."""
    calls = {"n": 0}
    original = objective_mod.LossFn.__call__

    def poisoned(self: objective_mod.LossFn, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if steps(calls["n"]):
            x = x.clone()
            x[item] = float("nan")
        return original(self, x)

    monkeypatch.setattr(objective_mod.LossFn, "__call__", poisoned)


def test_a_nan_in_one_item_is_recovered_in_that_item_alone(
    engine: StyleTransfer, jobs: list[GroupJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(optimizer="adam", init="noise")
    clean = run_group(engine, jobs, cfg)
    seen: list[Progress] = []
    _poison(monkeypatch, 1, lambda n: n == 3)
    outcomes = run_group(engine, [jobs[0], replace(jobs[1], on_progress=seen.append), jobs[2]], cfg)
    assert torch.equal(ok(outcomes[0]), ok(clean[0])) and torch.equal(ok(outcomes[2]), ok(clean[2]))
    assert seen[-1].recoveries == 1 and seen[-1].lr == pytest.approx(0.01)  # its lr halved, once
    assert not torch.equal(ok(outcomes[1]), ok(clean[1]))


def test_an_item_that_keeps_diverging_fails_alone(
    engine: StyleTransfer, jobs: list[GroupJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(optimizer="lbfgs")
    clean = run_group(engine, jobs, cfg)
    _poison(monkeypatch, 2, lambda n: n >= 2)
    outcomes = run_group(engine, jobs, cfg)
    assert isinstance(outcomes[2].error, EngineError) and outcomes[2].error.code == "diverged"
    for i in (0, 1):
        assert torch.equal(ok(outcomes[i]), ok(clean[i]))


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_an_items_checkpoint_resumes_alone(
    engine: StyleTransfer, jobs: list[GroupJob], optimizer: str
) -> None:
    """Per-item checkpoints are single-job checkpoints: resumed alone (torch's optimiser loads the
    exported state), the job finishes where the group took it."""
    cfg = small_config(optimizer=optimizer, init="noise", save_every=2)
    saved: list[Checkpoint] = []
    outcomes = run_group(engine, [jobs[0], replace(jobs[1], on_checkpoint=saved.append), jobs[2]], cfg)
    assert [(c.scale, c.iteration, c.end_of_scale) for c in saved] == [
        (0, 2, False),
        (0, 4, True),
        (1, 2, False),
        (1, 4, True),
    ]
    mid = Checkpoint.from_bytes(saved[2].to_bytes())  # scale 1, iteration 2: mid-scale
    assert mid.optimizer_state is not None and mid.image.shape[0] == 1
    group_settings = mid.optimizer_state["param_groups"][0]
    if optimizer == "lbfgs":  # a single run's L-BFGS: no tolerance stops it (optim.Stepper)
        assert group_settings["tolerance_grad"] == group_settings["tolerance_change"] == 0.0
    resumed = alone(engine, jobs[1], cfg, resume=mid)
    assert resumed.metadata["resumed_from_step"] == 6
    tolerance = 1e-4 if optimizer == "adam" else 2e-2  # L-BFGS: two steps of amplified rounding
    assert (resumed.tensor - ok(outcomes[1])).abs().max() < tolerance


def test_progress_is_read_every_n_iterations_and_at_scale_ends(
    engine: StyleTransfer, jobs: list[GroupJob]
) -> None:
    """Reads every 2 iterations; a checkpoint every 3 is taken at the first read past it."""
    cfg = small_config(optimizer="adam", iterations=5, save_every=3)
    seen: list[Progress] = []
    saved: list[Checkpoint] = []
    job = replace(jobs[0], on_progress=seen.append, on_checkpoint=saved.append)
    run_group(engine, [job, jobs[1]], cfg, report_every=2)
    assert [(p.scale, p.iteration) for p in seen] == [(0, 2), (0, 4), (0, 5), (1, 2), (1, 4), (1, 5)]
    assert [(c.scale, c.iteration, c.end_of_scale) for c in saved] == [
        (0, 4, False),
        (0, 5, True),
        (1, 4, False),
        (1, 5, True),
    ]


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_the_loop_reads_nothing_back_between_reports(
    engine: StyleTransfer, jobs: list[GroupJob], optimizer: str
) -> None:
    """Host reads do not grow with the iterations: the steps themselves never sync."""
    counts = []
    for iterations in (3, 9):
        cfg = small_config(optimizer=optimizer, iterations=iterations)
        counter = HostReads()
        with counter:
            run_group(engine, jobs[:2], cfg, report_every=100)  # reads at the scale ends only
        counts.append(counter.count)
    assert counts[0] == counts[1], counts


def test_jobs_of_different_shapes_cannot_be_grouped(
    engine: StyleTransfer, content: Image.Image, style: Image.Image
) -> None:
    tall = content.transpose(Image.Transpose.ROTATE_90)
    with pytest.raises(EngineError) as err:
        run_group(
            engine,
            [GroupJob(BatchItem(content, [style])), GroupJob(BatchItem(tall, [style]))],
            small_config(),
        )
    assert err.value.code == "batch_shape_mismatch"


def test_a_style_shared_by_jobs_is_one_vgg_pass_per_scale(
    engine: StyleTransfer,
    content: Image.Image,
    content2: Image.Image,
    style: Image.Image,
    style2: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target_passes: list[int] = []
    forward = VGGFeatures.forward

    def spy(self: VGGFeatures, x: torch.Tensor, wanted: frozenset[int]) -> dict[int, torch.Tensor]:
        if not x.requires_grad:
            target_passes.append(int(x.shape[0]))
        return forward(self, x, wanted)

    house = style.copy()  # another object with the same pixels: the same style
    jobs = [
        GroupJob(BatchItem(content, [style])),
        GroupJob(BatchItem(content2, [house])),
        GroupJob(BatchItem(content, [style2])),
    ]
    monkeypatch.setattr(VGGFeatures, "forward", spy)
    run_group(engine, jobs, small_config(optimizer="adam"))
    assert target_passes == [3, 1, 1] * 2  # per scale: the contents, then 2 distinct styles


class FakeEvent:
    """torch.cuda.Event's part the reader uses, on the CPU: ``done`` says what query() answers."""

    def __init__(self, done: bool = True) -> None:
        self.done, self.recorded, self.synchronized = done, 0, 0

    def record(self) -> None:
        self.recorded += 1

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True


def test_the_pinned_reader_gives_what_tolist_gives_in_one_host_read() -> None:
    events: list[FakeEvent] = []

    def make_event() -> FakeEvent:
        events.append(FakeEvent(done=False))  # the copy still in flight at the read: it waits
        return events[-1]

    last = torch.tensor([[1.5, 2.25, 1e-8], [float("nan"), 3.0, 0.1]], dtype=torch.float32)
    lrs = torch.tensor([0.02, 0.02 / 3], dtype=torch.float64)
    counts = torch.tensor([0, 2**40 + 1])
    started = torch.tensor([True, False])
    reader = PinnedReadback(2, 6, pin=False, event=make_event)
    with pytest.raises(RuntimeError):
        reader.read()  # nothing staged
    with pytest.raises(ValueError):
        reader.stage([last, lrs])  # 4 of 6 columns
    with HostReads() as reads:
        reader.stage([last, lrs, counts, started])
        assert reads.count == 0  # staging is a copy, not a read
        got = reader.read()
    assert reads.count == 1 and (reader.reads, reader.waits) == (1, 1)
    assert events[0].recorded == 1 and events[0].synchronized == 1
    want = [last.tolist(), lrs.tolist(), counts.tolist(), started.tolist()]
    assert repr(got) == repr(want)  # equal values and types (int, bool); NaN included
    with pytest.raises(RuntimeError):
        reader.read()  # one read per stage: a second would be stale
    reader.stage([last, lrs, counts, started])
    reader.read()
    assert (reader.reads, reader.waits, events[0].synchronized) == (2, 1, 1)  # the copy was done


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_a_group_read_through_the_pinned_buffer_ends_as_with_the_plain_read(
    engine: StyleTransfer, jobs: list[GroupJob], optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA read path on the CPU (an unpinned buffer, a fake event): the same progress, the
    same images bit for bit, and one host read per report instead of one per tensor."""
    cfg = small_config(optimizer=optimizer, init="noise", iterations=5)

    def run() -> tuple[list[GroupOutcome], list[Progress], int]:
        seen: list[Progress] = []
        with HostReads() as reads:
            outcomes = run_group(
                engine, [replace(jobs[0], on_progress=seen.append), *jobs[1:]], cfg, report_every=2
            )
        return outcomes, seen, reads.count

    plain, plain_seen, plain_reads = run()
    readers: list[PinnedReadback] = []

    def pinned(self: GroupPyramid, rows: int) -> PinnedReadback:
        readers.append(PinnedReadback(rows, 10, pin=False, event=FakeEvent))
        return readers[-1]

    monkeypatch.setattr(GroupPyramid, "_readback", pinned)
    staged, seen, reads = run()
    assert len(readers) == 2 and [r.reads for r in readers] == [3, 3]  # iterations 2, 4, 5 per scale
    assert [replace(p, elapsed=0.0) for p in seen] == [replace(p, elapsed=0.0) for p in plain_seen]
    for a, b in zip(plain, staged, strict=True):
        assert torch.equal(ok(a), ok(b))
    assert plain_reads - reads == 2 * 3 * 5  # per report, 6 .tolist() became 1
