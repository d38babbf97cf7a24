"""A worker's group (worker.batch) with real processes: ``stylequeue worker --cpu`` (one pool process,
``STYLEQUEUE_BATCH_MAX=4``, random weights), the API and a dispatcher (``stylequeue dispatch``), on a
fresh PostgreSQL database, Redis and moto's S3 (a versioned bucket: a result written twice would show).

Short lease / heartbeat / dispatch timings (the fault tests' own, tests/faults/test_worker_faults.py)
so a whole worker killed mid-group is noticed within seconds. Tiny images (32 px, 2 scales).

* four compatible jobs submitted in one batch run as ONE group (one ``grouped`` id, group_size 4 in
  each job's ``execution``); a job of another bucket (another size) runs alone;
* a group holds ONE slot: with a group of four running and a second worker started, the dispatcher
  publishes the next job at once and the second worker runs it while the group runs;
* ``kill -9`` of the whole worker while the four run as a group: their leases expire, the dispatcher
  requeues them, a new worker resumes each from its own last checkpoint (alone, or in a group again
  with the jobs that resume at the same scale) and every job ends ``succeeded`` exactly once;
* a canceled member ends canceled within seconds while the group runs on; a group whose members
  are all canceled frees its slot within seconds.

A test that leaves jobs of a long group running cancels them (``_drop_group``): the group stops
once every member has left.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from tests.support import chaos_lib, scenarios
from tests.support.servers import REDIS_HOST, REDIS_PORT, port_open, require, temporary_database
from tests.support.stacks import FAST_TIMING, Stack, make_key, stack_env, stack_settings, start
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 2 scales (16 and 32 px) x 4 iterations: a group of four ends in a few seconds.
SMALL = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 4}
# Another bucket: another size (so other per-scale sizes).
OTHER = {**SMALL, "size": 24}
# Long enough to kill mid-group after every member wrote a checkpoint (every 10 steps): 2 x 30 steps.
KILLABLE = {**SMALL, "iterations": 30}
KILLABLE_STEPS = 60
# A group that outlasts a second worker's start and another job's run (dropped once seen).
ENDLESS = {**SMALL, "iterations": 300}
TIMING = {**FAST_TIMING, "batch_max": 4}
TERMINAL = {"succeeded", "failed", "canceled"}


@dataclass
class GroupStack:
    stack: Stack
    s3: Any
    bucket: str
    prefix: str = "sq"
    kills: list[str] = field(default_factory=list)

    def ensure_running(self) -> None:
        """The worker and the dispatcher, (re)started if they are not running."""
        proc = self.stack.procs.get("worker")
        if proc is None or proc.poll() is not None:
            self.stack.procs.pop("worker", None)
            self.stack.forget_ready("worker")
            self.stack.start_worker()  # one pool process: one slot
        dispatcher = self.stack.procs.get("dispatch")
        if dispatcher is None or dispatcher.poll() is not None:
            self.stack.procs["dispatch"] = start(
                ["dispatch", "--interval", "0.5"], self.stack.env, self.stack.log_of("dispatch")
            )

    def kill_worker(self) -> None:
        """``kill -9`` the whole worker: the Celery main process, its pool child, the supervisor."""
        chaos_lib.kill_whole_worker(self.stack.procs.pop("worker"))
        self.stack.forget_ready("worker")
        self.kills.append("whole:worker")

    def submit(self, images: list[bytes], styles: list[bytes], params: dict[str, Any]) -> list[str]:
        """One batch request: every content x every style."""
        with self.stack.client() as c:
            content_ids = [str(c.upload_image(b, f"content{i}.png")["id"]) for i, b in enumerate(images)]
            style_ids = [str(c.upload_image(b, f"style{i}.png")["id"]) for i, b in enumerate(styles)]
            return [str(j) for j in c.submit_batch(content_ids, style_ids, params=params)["job_ids"]]

    def wait_terminal(self, job_ids: list[str], timeout: float = 90) -> None:
        def done() -> bool:
            return all(self.stack.job(j).status in TERMINAL for j in job_ids)

        try:
            wait_for(done, timeout, f"jobs {job_ids} to end", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def events(self, job_id: str | None = None) -> list[chaos_lib.Event]:
        return chaos_lib.job_events([self.stack.worker_log], job_id)

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.stack.log_tail(40, name=n)}" for n in ("worker", "dispatch"))

    def api_job(self, job_id: str) -> dict[str, Any]:
        return scenarios.status(self.stack, job_id)

    def assert_succeeded_once(self, job_id: str, attempt: int, resumed_from: int | None) -> dict[str, Any]:
        """Succeeded, exactly once, under ``attempt`` (the fault tests' check); the API's view."""
        with contextlib.suppress(AssertionError):  # the line follows the row's commit: wait for it
            wait_for(
                lambda: chaos_lib.count(self.events(job_id), "succeeded") >= 1,
                30,
                f"the succeeded event of {job_id} in the worker log",
                interval=0.1,
            )
        row = self.stack.job(job_id)
        events = self.events(job_id)
        context = f"kills={self.kills}\n{self.tails()}"
        assert row.status == "succeeded", (row.status, row.error_code, row.error_message, context)
        assert row.attempt == attempt, (row.attempt, context)
        assert [e.attempt for e in events if e.event == "succeeded"] == [attempt], context
        resumes = [e.int("step") for e in events if e.event == "resuming" and e.attempt == attempt]
        assert resumes == ([] if resumed_from is None else [resumed_from]), (resumes, resumed_from, context)
        assert row.result_key == f"jobs/{job_id}/result.a{attempt}.png"
        assert scenarios.result_keys(self.stack, job_id) == [row.result_key], context  # one object
        assert chaos_lib.versions(self.s3, self.bucket, f"{self.prefix}/{row.result_key}") == 1, context
        job = self.api_job(job_id)
        assert job["status"] == "succeeded" and job["execution"] is not None, job
        assert job["execution"]["device"] == "cpu" and job["execution"]["random_weights"] is True, job
        return job


@pytest.fixture(scope="module")
def group_stack(
    _redis_db: int, _moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GroupStack]:
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    from shared.migrate import upgrade

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    tmp = tmp_path_factory.mktemp("group-stack")
    s3 = chaos_lib.s3_client(_moto_server)
    bucket = f"sq-groups-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    chaos_lib.enable_versioning(s3, bucket)
    # A database of its own: no other stack's dispatcher requeues or publishes these jobs.
    with temporary_database("sq_groups") as db_url:
        env = stack_env(
            tmp,
            database_url=db_url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}",
            storage_url=f"s3://{bucket}/sq",
            s3_endpoint_url=_moto_server,
            **TIMING,
        )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            env[name] = os.environ[name]
        stack = Stack("groups", env, stack_settings(env), tmp)
        assert stack.settings.batch_max == 4
        upgrade(stack.settings.database_url)
        gs = GroupStack(stack, s3, bucket)
        try:
            gs.ensure_running()
            stack.start_api()
            stack.key = make_key(stack.settings)
            yield gs
        finally:
            stack.close()


@pytest.fixture
def gs(group_stack: GroupStack) -> GroupStack:
    group_stack.ensure_running()
    group_stack.kills.clear()
    return group_stack


def _variants(data: bytes) -> list[bytes]:
    """The image's central square and its mirror image: two inputs of one size (so one bucket)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    out = []
    for variant in (im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        buf = io.BytesIO()
        variant.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture
def inputs(images: dict[str, bytes]) -> tuple[list[bytes], list[bytes]]:
    """Two 64 x 64 contents and two styles: 2 x 2 compatible jobs."""
    contents = _variants(images["content_astronaut"])
    assert {Image.open(io.BytesIO(b)).size for b in contents} == {(64, 64)}
    return contents, _variants(images["style_hokusai_great_wave"])


def _groups(gs: GroupStack, job_ids: list[str], attempt: int) -> dict[str, str]:
    """Each job's ``grouped`` group id under ``attempt`` (from the worker log)."""
    found: dict[str, str] = {}
    for e in gs.events():
        if e.event == "grouped" and e.job_id in job_ids and e.attempt == attempt:
            assert e.job_id not in found, (e, gs.tails())  # grouped once per attempt
            found[e.job_id] = e.fields["group"]
            assert e.fields.get("jobs") == str(len(job_ids)), (e, gs.tails())
    return found


def test_compatible_jobs_run_as_one_group_and_another_bucket_alone(
    gs: GroupStack, inputs: tuple[list[bytes], list[bytes]]
) -> None:
    """One slot, 2 contents x 2 styles in one request: the dispatcher publishes one of them (one free
    slot), the worker takes the other three from the table and runs the four as one batch. A job of
    another size submitted right after waits for the slot and runs alone."""
    contents, styles = inputs
    job_ids = gs.submit(contents, styles, SMALL)
    assert len(job_ids) == 4
    other = gs.submit(contents[:1], styles[:1], OTHER)[0]
    assert len({gs.stack.job(j).bucket for j in job_ids}) == 1
    assert gs.stack.job(other).bucket not in (None, gs.stack.job(job_ids[0]).bucket)
    gs.wait_terminal([*job_ids, other])
    for job_id in job_ids:
        job = gs.assert_succeeded_once(job_id, attempt=1, resumed_from=None)
        assert job["execution"]["group_size"] == 4, job
        with gs.stack.client() as c:
            path = c.download_result(job_id, gs.stack.tmp / f"{job_id}.png")
        assert Image.open(path).size == (32, 32)
    groups = _groups(gs, job_ids, attempt=1)
    assert set(groups) == set(job_ids) and len(set(groups.values())) == 1, (groups, gs.tails())
    (group,) = set(groups.values())
    ended = [e for e in gs.events() if e.event == "group_member_ended" and e.fields.get("group") == group]
    assert sorted(e.job_id for e in ended) == sorted(job_ids), gs.tails()
    assert {e.fields.get("outcome") for e in ended} == {"succeeded"}, gs.tails()
    # one delivery claimed (the dispatcher's message); the three others were taken from the table
    assert chaos_lib.count([e for e in gs.events() if e.job_id in job_ids], "claimed") == 1, gs.tails()
    job = gs.assert_succeeded_once(other, attempt=1, resumed_from=None)
    assert job["execution"]["group_size"] == 1, job
    assert chaos_lib.count(gs.events(other), "grouped") == 0, gs.tails()


def _run_as_a_group(gs: GroupStack, job_ids: list[str], checkpointed: bool = False) -> str:
    """Wait until the jobs all run (each past a checkpoint) as ONE group; its id."""

    def ready() -> bool:
        rows = [gs.stack.job(j) for j in job_ids]
        assert not [r for r in rows if r.status in TERMINAL], ([(r.id, r.status) for r in rows], gs.tails())
        return all(r.status == "running" and (r.checkpoints or not checkpointed) for r in rows)

    what = "each past a checkpoint" if checkpointed else "running"
    wait_for(ready, 60, f"the {len(job_ids)} jobs {what}", interval=0.02)
    groups = _groups(gs, job_ids, attempt=1)
    assert set(groups) == set(job_ids) and len(set(groups.values())) == 1, (groups, gs.tails())
    assert len({gs.stack.job(j).worker for j in job_ids}) == 1  # one pool process holds them all
    return next(iter(groups.values()))


def _drop_group(gs: GroupStack, job_ids: list[str]) -> None:
    """Cancel the jobs still running: each ends canceled at once, and the group stops once every
    member has left (its pool process is free for the next job)."""
    with gs.stack.client() as c:
        for job_id in job_ids:
            if gs.stack.job(job_id).status not in TERMINAL:
                c.cancel(job_id)
    gs.wait_terminal(job_ids, timeout=30)
    assert {gs.stack.job(j).status for j in job_ids} == {"canceled"}, gs.tails()


def test_a_group_holds_one_slot_so_a_second_worker_runs_the_next_job(
    gs: GroupStack, inputs: tuple[list[bytes], list[bytes]]
) -> None:
    """The dispatcher counts the pool process running a group as ONE slot (not one per member):
    with four jobs running as a group on the worker and a second worker (one slot) started, a job
    submitted then is published at once and runs on the second worker while the group runs."""
    contents, styles = inputs
    job_ids = gs.submit(contents, styles, ENDLESS)
    try:
        _run_as_a_group(gs, job_ids)
        gs.stack.start_worker(name="b")
        other = gs.submit(contents[:1], styles[:1], SMALL)[0]
        try:
            scenarios.wait_status(gs.stack, other, TERMINAL, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- b ---\n{gs.stack.log_tail(40, name='b')}") from None
        assert all(gs.stack.job(j).status == "running" for j in job_ids), (
            "the group ended first: make it longer"
        )
        job = gs.api_job(other)
        assert job["status"] == "succeeded" and job["execution"]["group_size"] == 1, job
        claims = chaos_lib.job_events([gs.stack.log_of("b")], other)
        assert [e.event for e in claims if e.event == "claimed"] == ["claimed"], gs.stack.log_tail(
            40, name="b"
        )
    finally:  # leave the stack idle for the next test: one worker, no job running
        second = gs.stack.procs.get("b")
        if second is not None and second.poll() is None:
            second.send_signal(signal.SIGTERM)  # its warm shutdown runs while the group is dropped
        _drop_group(gs, job_ids)
        if second is not None:
            gs.stack.stop_worker("b")


def test_a_canceled_member_ends_canceled_while_the_group_runs_on(
    gs: GroupStack, inputs: tuple[list[bytes], list[bytes]]
) -> None:
    """Cancel one member of a running group: it ends canceled within seconds (as a job run alone
    does, tests/support/scenarios.cancel_queued_and_running), while the others run on."""
    contents, styles = inputs
    job_ids = gs.submit(contents, styles, ENDLESS)
    victim, *others = job_ids
    try:
        _run_as_a_group(gs, job_ids)
        with gs.stack.client() as c:
            c.cancel(victim)
        job = scenarios.wait_status(gs.stack, victim, TERMINAL, timeout=5)
        assert job["status"] == "canceled", job
        rows = [gs.stack.job(j) for j in others]
        assert all(r.status == "running" for r in rows), [(r.id, r.status) for r in rows]
    finally:
        _drop_group(gs, job_ids)


def test_a_group_whose_members_are_all_canceled_frees_its_slot_at_once(
    gs: GroupStack, inputs: tuple[list[bytes], list[bytes]]
) -> None:
    """Cancel every member of a running group: the pool process is free within seconds, so the next
    job (waiting for the one slot) starts."""
    contents, styles = inputs
    job_ids = gs.submit(contents, styles, ENDLESS)
    nxt: list[str] = []
    try:
        _run_as_a_group(gs, job_ids)
        nxt += gs.submit(contents[:1], styles[:1], SMALL)
        with gs.stack.client() as c:
            for job_id in job_ids:
                c.cancel(job_id)
        scenarios.wait_status(gs.stack, nxt[0], {"running", *TERMINAL}, timeout=5)
        assert {gs.stack.job(j).status for j in job_ids} == {"canceled"}
    finally:
        _drop_group(gs, job_ids)
        gs.wait_terminal(nxt)


def test_kill9_of_the_worker_mid_group_every_member_succeeds_once(
    gs: GroupStack, inputs: tuple[list[bytes], list[bytes]]
) -> None:
    """``kill -9`` of the whole worker once the four run as a group and each wrote a checkpoint: the
    dispatcher requeues each when its lease expires, a new worker resumes each from its own last
    checkpoint, attempt 2 (a regrouped job only with jobs that resume at its scale); one
    ``succeeded`` event and one result object per job."""
    contents, styles = inputs
    job_ids = gs.submit(contents, styles, KILLABLE)
    _run_as_a_group(gs, job_ids, checkpointed=True)
    gs.kill_worker()
    rows = {j: gs.stack.job(j) for j in job_ids}  # the dead attempt writes no more
    for row in rows.values():
        assert row.status == "running" and row.attempt == 1, (row.status, row.attempt)
        assert row.progress.get("step", 0) < KILLABLE_STEPS, ("ended before the kill", row.progress)
    resumed_from = {j: int(r.checkpoints[-1]["step"]) for j, r in rows.items()}
    scales = {j: r.resume_scale for j, r in rows.items()}
    gs.ensure_running()  # a new worker (and the dispatcher, which never stopped)
    gs.wait_terminal(job_ids, timeout=120)
    sizes: dict[str, int] = {}
    for job_id in job_ids:
        job = gs.assert_succeeded_once(job_id, attempt=2, resumed_from=resumed_from[job_id])
        later = [c["step"] for c in gs.stack.job(job_id).checkpoints if c["step"] > resumed_from[job_id]]
        assert later and later[-1] == KILLABLE_STEPS, gs.stack.job(job_id).checkpoints  # it went on
        sizes[job_id] = job["execution"]["group_size"]
    regrouped: dict[str, list[str]] = {}  # the leases expire one by one: any grouping may form
    for e in gs.events():
        if e.event == "grouped" and e.job_id in job_ids and e.attempt == 2:
            regrouped.setdefault(e.fields["group"], []).append(e.job_id)
    for members in regrouped.values():
        assert len({scales[j] for j in members}) == 1, (members, scales)  # one scale per group
        assert {sizes[j] for j in members} == {len(members)}, (members, sizes)
    grouped = {j for members in regrouped.values() for j in members}
    assert all(sizes[j] == 1 for j in job_ids if j not in grouped), sizes
    requeued = chaos_lib.job_events([gs.stack.log_of("dispatch")])
    for job_id in job_ids:  # the dispatcher's reconcile step brought them back
        assert any(e.job_id == job_id and e.event == "lease_expired" for e in requeued), gs.tails()
