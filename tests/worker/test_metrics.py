"""The worker's metrics (worker.metrics): outcomes, durations, queue waits, iterations, group sizes and
GPU memory as settlement records them; prometheus_client's multiprocess mode adding up several
processes' files on the host's port (shared.metrics.host_metrics), dead processes' live gauges
dropped; and the dispatcher's database gauges (shared.metrics.JobsCollector) on this SQLite database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from shared import metrics as shared_metrics
from shared.buckets import bucket_key
from shared.db import get_sessionmaker
from shared.models import Job, Tenant, Worker, utcnow
from shared.params import JobParams
from shared.settings import Settings
from shared.storage import open_storage
from tests.support import REPO
from tests.support.images import png
from tests.support.jobs import CONTENT, NODE, STYLE, MakeJob
from tests.support.servers import free_port
from tests.support.waiting import wait_for
from tests.worker.fakes import FakeEngine, FakeResult
from worker import jobstore, metrics, runner, settle
from worker.tasks import run_job as run_job_task
from worker.watcher import StopReason

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class CountingEngine(FakeEngine):
    """The fake engine, with the step count and seconds the real one puts in a result's metadata."""

    def run(self, *args: Any, **kwargs: Any) -> FakeResult:
        result = super().run(*args, **kwargs)
        resume = kwargs.get("resume")
        result.metadata.update(
            steps=self.scales * self.iterations,
            seconds=0.5,
            resumed_from_step=resume.step if resume is not None else None,
        )
        return result


@pytest.fixture
def counting_engine(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> CountingEngine:
    fake = CountingEngine()
    monkeypatch.setattr(runner, "get_engine", lambda _s: fake)
    monkeypatch.setattr(runner, "refill", lambda _settings: None)
    return fake


# --- settlement ------------------------------------------------------------------------------------


def test_a_delivered_job_counts_its_outcome_duration_wait_and_iterations(
    settings: Settings, counting_engine: CountingEngine, make_job: MakeJob
) -> None:
    job_id = make_job(created_at=utcnow() - timedelta(seconds=40))
    succeeded = {"outcome": "succeeded"}
    before = {
        "jobs": sample("stylequeue_worker_jobs_total", **succeeded),
        "duration": sample("stylequeue_worker_job_duration_seconds_count", **succeeded),
        "wait": sample("stylequeue_worker_queue_wait_seconds_count"),
        "wait_sum": sample("stylequeue_worker_queue_wait_seconds_sum"),
        "iterations": sample("stylequeue_worker_iterations_total"),
        "speed": sample("stylequeue_worker_iterations_per_second_sum"),
    }
    assert run_job_task(job_id) == "succeeded"  # the Celery task, run in this process
    assert sample("stylequeue_worker_jobs_total", **succeeded) == before["jobs"] + 1
    assert sample("stylequeue_worker_job_duration_seconds_count", **succeeded) == before["duration"] + 1
    assert sample("stylequeue_worker_queue_wait_seconds_count") == before["wait"] + 1
    assert 39 < sample("stylequeue_worker_queue_wait_seconds_sum") - before["wait_sum"] < 120
    assert sample("stylequeue_worker_iterations_total") == before["iterations"] + 6
    assert sample("stylequeue_worker_iterations_per_second_sum") == pytest.approx(before["speed"] + 12)
    assert sample("stylequeue_worker_busy", gpu=metrics.gpu_label()) == 0  # the delivery is over
    assert metrics._started == {}


def test_a_dropped_delivery_is_counted_by_reason(
    settings: Settings, counting_engine: CountingEngine, make_job: MakeJob
) -> None:
    job_id = make_job(status="succeeded")
    before = sample("stylequeue_worker_deliveries_dropped_total", reason="terminal")
    assert run_job_task(job_id) == "dropped:terminal"
    assert sample("stylequeue_worker_deliveries_dropped_total", reason="terminal") == before + 1
    assert metrics._started == {}  # a dropped delivery leaves no attempt timed


def test_failures_count_their_code_and_a_fenced_write_is_no_failure(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = make_job()
    claim = _claim(settings, job_id)
    failed, fenced = {"outcome": "failed"}, {"outcome": "fenced"}
    before = [
        sample("stylequeue_worker_jobs_total", **failed),
        sample("stylequeue_worker_job_failures_total", code="invalid_params"),
        sample("stylequeue_worker_jobs_total", **fenced),
    ]
    metrics.attempt_started(job_id)
    assert settle.fail(settings, claim, "invalid_params", "bad", False) == "failed"
    assert settle.fail(settings, claim, "invalid_params", "again", False) == "fenced"  # not ours any more
    assert sample("stylequeue_worker_jobs_total", **failed) == before[0] + 1
    assert sample("stylequeue_worker_job_failures_total", code="invalid_params") == before[1] + 1
    assert sample("stylequeue_worker_jobs_total", **fenced) == before[2] + 1
    assert sample("stylequeue_worker_job_duration_seconds_count", outcome="failed") >= 1


def test_a_cancel_and_a_hand_back_are_outcomes(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settle, "publish_job", lambda _app, _job_id: None)  # no broker here
    monkeypatch.setattr(settle, "get_celery", lambda: None)
    canceled, handed_back = (_claim(settings, make_job()) for _ in range(2))
    before = [sample("stylequeue_worker_jobs_total", outcome=o) for o in ("canceled", "handed_back")]
    with get_sessionmaker(settings.database_url)() as s:  # the API's cancel of a running job
        s.execute(update(Job).where(Job.id == canceled.job_id).values(cancel_requested=True))
        s.commit()
    assert settle.stopped(settings, canceled, StopReason.CANCELED) == "canceled"
    assert settle.stopped(settings, handed_back, StopReason.SHUTDOWN) == "handed_back"
    assert sample("stylequeue_worker_jobs_total", outcome="canceled") == before[0] + 1
    assert sample("stylequeue_worker_jobs_total", outcome="handed_back") == before[1] + 1


def _claim(settings: Settings, job_id: str) -> jobstore.Claim:
    claim = jobstore.claim(settings.database_url, job_id, f"{NODE}#1", 60)
    assert isinstance(claim, jobstore.Claim)
    return claim


def test_unknown_outcomes_and_odd_codes_stay_bounded() -> None:
    before = sample("stylequeue_worker_jobs_total", outcome="other")
    metrics.attempt_ended("x", "something new", "Not A Code; DROP TABLE")
    assert sample("stylequeue_worker_jobs_total", outcome="other") == before + 1
    assert sample("stylequeue_worker_job_failures_total", code="other") >= 1


def test_a_group_observes_its_size_and_each_member(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 3}
    bucket = bucket_key(JobParams(**params), (48, 48))
    storage = open_storage(settings)
    storage.put_bytes(f"images/{CONTENT}", png())
    storage.put_bytes(f"images/{STYLE}", png((255, 200, 0)))
    monkeypatch.setattr(runner, "refill", lambda _settings: None)
    grouped = settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 0})
    first, *mates = [make_job(bucket=bucket, params=params) for _ in range(3)]
    before = {
        "groups": sample("stylequeue_worker_group_size_count"),
        "sizes": sample("stylequeue_worker_group_size_sum"),
        "jobs": sample("stylequeue_worker_jobs_total", outcome="succeeded"),
        "timed": sample("stylequeue_worker_job_duration_seconds_count", outcome="succeeded"),
        "iterations": sample("stylequeue_worker_iterations_total"),
    }
    metrics.attempt_started(first)
    with metrics.delivery():
        assert runner.run_job(first, NODE, grouped) == "succeeded"
    assert sample("stylequeue_worker_group_size_count") == before["groups"] + 1
    assert sample("stylequeue_worker_group_size_sum") == before["sizes"] + 3
    assert sample("stylequeue_worker_jobs_total", outcome="succeeded") == before["jobs"] + 3
    assert sample("stylequeue_worker_job_duration_seconds_count", outcome="succeeded") == before["timed"] + 3
    assert sample("stylequeue_worker_iterations_total") == before["iterations"] + 3 * 6  # 2 scales x 3


def test_gpu_memory_gauges_read_cuda_once_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    gpu = metrics.gpu_label()
    before = sample("stylequeue_worker_gpu_memory_peak_bytes", gpu=gpu)
    metrics.gpu_memory()  # CUDA not in use here: nothing read, nothing set
    assert sample("stylequeue_worker_gpu_memory_peak_bytes", gpu=gpu) == before
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3_000_000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (6_000_000, 10_000_000))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: resets.append(True))
    metrics.gpu_memory()
    assert sample("stylequeue_worker_gpu_memory_peak_bytes", gpu=gpu) == 3_000_000
    assert sample("stylequeue_worker_gpu_memory_used_bytes", gpu=gpu) == 4_000_000
    assert sample("stylequeue_worker_gpu_memory_total_bytes", gpu=gpu) == 10_000_000
    assert resets == [True]  # the next delivery's peak is its own


def test_gpu_label_is_the_worker_s_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert metrics.gpu_label() == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert metrics.gpu_label() == "cpu"


# --- multiprocess mode: the host's port ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from worker import metrics
    metrics.attempt_started("job")
    metrics.attempt_ended("job", "succeeded")
    metrics.attempt_ended("job2", "failed", "time_limit")
    metrics.BUSY.labels("cpu").inc()
    print("recorded", flush=True)
    if sys.argv[1] == "stay":
        time.sleep(120)
    """
)


def _child(env: dict[str, str], mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``host_metrics`` on a free port with a token: its URL and the environment of its workers."""
    port = free_port()
    with shared_metrics.host_metrics(port, "tok") as extra:
        env = {k: v for k, v in os.environ.items() if k != shared_metrics.MULTIPROC_ENV}
        yield f"http://127.0.0.1:{port}", {**env, **extra}
    assert not Path(extra[shared_metrics.MULTIPROC_ENV]).exists()  # the folder it made is removed


def test_the_host_port_adds_up_every_process_and_drops_dead_ones(host: tuple[str, dict[str, str]]) -> None:
    url, env = host
    for _ in range(2):  # two pool processes that ended (as after max-tasks-per-child)
        assert _child(env, "exit").wait(60) == 0
    staying = _child(env, "stay")
    try:
        assert staying.stdout is not None and staying.stdout.readline().strip() == "recorded"
        got = parse(_get(url).text)
        assert got[("stylequeue_worker_jobs_total", frozenset({("outcome", "succeeded")}))] == 3
        assert got[("stylequeue_worker_job_failures_total", frozenset({("code", "time_limit")}))] == 3
        assert (
            got[("stylequeue_worker_job_duration_seconds_count", frozenset({("outcome", "succeeded")}))] == 3
        )
        # livesum: the processes that exited without marking themselves dead do not count
        assert got[("stylequeue_worker_busy", frozenset({("gpu", "cpu")}))] == 1
    finally:
        staying.send_signal(signal.SIGKILL)  # as a pool process lost: no shutdown hook ran
        staying.wait(10)
    got = parse(_get(url).text)
    assert ("stylequeue_worker_busy", frozenset({("gpu", "cpu")})) not in got
    assert got[("stylequeue_worker_jobs_total", frozenset({("outcome", "succeeded")}))] == 3  # counters stay


def test_the_host_port_needs_its_token(host: tuple[str, dict[str, str]]) -> None:
    url, _ = host
    assert httpx.get(f"{url}/metrics", timeout=5).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer no"}, timeout=5).status_code == 401
    assert httpx.get(f"{url}/other", headers={"Authorization": "Bearer tok"}, timeout=5).status_code == 404


def test_port_zero_serves_nothing() -> None:
    with shared_metrics.host_metrics(0, "") as extra:
        assert extra == {}


def _get(url: str) -> httpx.Response:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer tok"}, timeout=5)
    assert r.status_code == 200, r.text
    return r


# --- the dispatcher's gauges (shared.metrics.JobsCollector), on this SQLite database ------------------


def _collected(settings: Settings, top: int = shared_metrics.TOP_TENANTS) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    sessions = get_sessionmaker(settings.database_url)
    registry.register(shared_metrics.JobsCollector(sessions, lease_s=settings.lease_s, top=top))
    return parse(generate_latest(registry).decode())


def test_database_gauges_by_status_and_tenant(settings: Settings, make_job: MakeJob) -> None:
    with get_sessionmaker(settings.database_url)() as s:
        s.add_all([Tenant(id="t2", name="bob"), Tenant(id="t3", name="carol")])
        s.add(Worker(id="gpu0@h#1", host="h", device="cuda", weights="w", slots=2, status="healthy"))
        s.commit()
    for _ in range(3):
        make_job(created_at=utcnow() - timedelta(seconds=90))
    _job(settings, "t2")
    _job(settings, "t2", status="running")
    _job(settings, "t3", status="failed", finished_at=utcnow())
    _job(settings, "t3", status="succeeded", finished_at=utcnow() - timedelta(hours=3))  # too old
    got = _collected(settings)

    def g(name: str, **labels: str) -> float | None:
        return got.get((name, frozenset(labels.items())))

    assert g("stylequeue_db_metrics_up") == 1
    assert g("stylequeue_jobs", status="queued") == 4 and g("stylequeue_jobs", status="running") == 1
    assert g("stylequeue_tenant_jobs", status="queued", tenant="t1") == 3
    assert g("stylequeue_tenant_jobs", status="queued", tenant="bob") == 1
    assert g("stylequeue_tenant_jobs", status="running", tenant="bob") == 1
    assert g("stylequeue_jobs_finished_last_hour", status="failed", tenant="carol") == 1
    assert g("stylequeue_jobs_finished_last_hour", status="succeeded", tenant="carol") is None
    assert 80 < (g("stylequeue_jobs_oldest_queued_age_seconds") or 0) < 600
    assert (
        g("stylequeue_workers", status="healthy") == 1
        and g("stylequeue_workers_slots", status="healthy") == 2
    )
    # bounded: beyond the top tenant, the others are summed as "other"
    bounded = _collected(settings, top=1)
    assert bounded[("stylequeue_tenant_jobs", frozenset({("status", "queued"), ("tenant", "t1")}))] == 3
    other = frozenset({("status", "queued"), ("tenant", "other")})
    assert bounded[("stylequeue_tenant_jobs", other)] == 1
    assert not [k for k in bounded if ("tenant", "bob") in k[1]]


def _job(settings: Settings, tenant: str, **fields: Any) -> None:
    with get_sessionmaker(settings.database_url)() as s:
        s.add(Job(tenant_id=tenant, content_image_id=CONTENT, style_image_ids=[STYLE], **fields))
        s.commit()


def test_database_gauges_report_a_failed_read(settings: Settings) -> None:
    broken = settings.model_copy(update={"database_url": "sqlite:////nonexistent/folder/db.sqlite"})
    got = _collected(broken)
    assert got[("stylequeue_db_metrics_up", frozenset())] == 0
    assert not [k for k in got if k[0] == "stylequeue_jobs"]


def test_the_dispatcher_port_serves_the_gauges(settings: Settings, make_job: MakeJob) -> None:
    make_job()
    port = free_port()
    sessions = get_sessionmaker(settings.database_url)
    httpd = shared_metrics.serve_dispatcher_metrics(sessions, port=port, token="", lease_s=30)
    try:
        r = wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/metrics"), 10, "the dispatcher's port")
        got = parse(r.text)
        assert got[("stylequeue_jobs", frozenset({("status", "queued")}))] == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def _try_get(url: str) -> httpx.Response | None:
    try:
        r = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None
