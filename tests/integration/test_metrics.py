"""Metrics on real processes: ``stylequeue worker`` (two pool processes, multiprocess mode, one port),
``stylequeue api`` and ``stylequeue dispatch``, each with its metrics on and the token set, on a fresh
PostgreSQL database and Redis: the counters move with the work. And, without processes: every metric
the Grafana dashboard queries is one the code exports; the scrape config names every target."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from api import metrics as api_metrics
from shared import metrics as shared_metrics
from shared.db import get_sessionmaker
from shared.migrate import upgrade
from shared.settings import Settings
from tests.support import REPO, scenarios
from tests.support.servers import REDIS_HOST, REDIS_PORT, free_port, port_open, require, temporary_database
from tests.support.stacks import TINY, Stack, stack_env, stack_settings, start
from tests.support.waiting import wait_for
from worker import metrics as worker_metrics

DEPLOY = REPO / "deploy"
TOKEN = "it-" + uuid.uuid4().hex
TENANT = "metrics-tenant"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str, token: str | None = TOKEN) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return parse(r.text)


class MetricsStack:
    def __init__(self, stack: Stack, worker_port: int, dispatcher_port: int) -> None:
        self.stack = stack
        self.worker = f"http://127.0.0.1:{worker_port}/metrics"
        self.dispatcher = f"http://127.0.0.1:{dispatcher_port}/metrics"

    @property
    def api(self) -> str:
        return f"{self.stack.api_url}/metrics"

    def tails(self) -> str:
        return "\n".join(
            f"--- {n} ---\n{self.stack.log_tail(30, name=n)}" for n in ("worker", "dispatch", "api")
        )


@pytest.fixture(scope="module")
def metrics_stack(_redis_db: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    tmp = tmp_path_factory.mktemp("metrics-stack")
    worker_port, dispatcher_port = free_port(), free_port()
    # A database of its own: no other stack's jobs in the gauges, no other dispatcher publishing.
    with temporary_database("sq_metrics") as db_url:
        env = stack_env(
            tmp,
            database_url=db_url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}",
            metrics_token=TOKEN,
            worker_metrics_port=worker_port,
            dispatcher_metrics_port=dispatcher_port,
            dispatch_interval_s=0.5,
        )
        stack = Stack("metrics", env, stack_settings(env), tmp)
        upgrade(stack.settings.database_url)
        try:
            stack.start_worker("--concurrency", "2")
            stack.procs["dispatch"] = start(["dispatch"], env, stack.log_of("dispatch"))
            stack.start_api()
            stack.key = _key(stack.settings)
            yield MetricsStack(stack, worker_port, dispatcher_port)
        finally:
            stack.close()


def _key(settings: Settings) -> str:
    from shared.tenants import create_key

    with get_sessionmaker(settings.database_url)() as s:
        key = create_key(s, TENANT).key
        s.commit()
    return key


@pytest.mark.integration
@pytest.mark.slow
def test_counters_move_with_the_work(metrics_stack: MetricsStack, images: dict[str, bytes]) -> None:
    ms = metrics_stack
    worker_before, api_before = scrape(ms.worker), scrape(ms.api)
    job_ids = scenarios.submit(ms.stack, images, TINY, ("content_astronaut", "content_chelsea_cat"))
    assert len(job_ids) == 2
    for job_id in job_ids:
        job = scenarios.wait_status(ms.stack, job_id, {"succeeded", "failed", "canceled"})
        assert job["status"] == "succeeded", job

    def worker_delta(name: str, **labels: str) -> float:
        return value(scrape(ms.worker), name, **labels) - value(worker_before, name, **labels)

    # the counter moves just after the row's commit that the API showed: wait for it
    succeeded = {"outcome": "succeeded"}
    wait_for(lambda: worker_delta("stylequeue_worker_jobs_total", **succeeded) == 2, 30, "2 succeeded")
    after = scrape(ms.worker)
    assert (
        value(after, "stylequeue_worker_job_duration_seconds_count", **succeeded)
        - value(worker_before, "stylequeue_worker_job_duration_seconds_count", **succeeded)
        == 2
    ), ms.tails()
    assert worker_delta("stylequeue_worker_queue_wait_seconds_count") == 2
    steps = 2 * TINY["iterations"]  # two scales
    assert worker_delta("stylequeue_worker_iterations_total") == 2 * steps
    wait_for(lambda: value(scrape(ms.worker), "stylequeue_worker_busy", gpu="cpu") == 0, 30, "idle workers")
    assert value(after, "stylequeue_worker_jobs_total", outcome="failed") == 0, ms.tails()

    api_after = scrape(ms.api)
    assert (
        value(api_after, "stylequeue_api_submissions_total", kind="batch")
        - value(api_before, "stylequeue_api_submissions_total", kind="batch")
        == 1
    )
    assert (
        value(api_after, "stylequeue_api_jobs_created_total", kind="batch")
        - value(api_before, "stylequeue_api_jobs_created_total", kind="batch")
        == 2
    )
    polled = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "200"}
    assert value(api_after, "stylequeue_api_requests_total", **polled) > value(
        api_before, "stylequeue_api_requests_total", **polled
    )
    assert not [k for k in api_after if any(j in v for j in job_ids for _, v in k[1])]  # templates only

    def finished() -> Samples | None:
        got = scrape(ms.dispatcher)
        labels = {"status": "succeeded", "tenant": TENANT}
        return got if value(got, "stylequeue_jobs_finished_last_hour", **labels) == 2 else None

    gauges = wait_for(finished, 30, "the dispatcher's gauges to show the two jobs", interval=0.5)
    assert value(gauges, "stylequeue_db_metrics_up") == 1
    assert value(gauges, "stylequeue_jobs", status="queued") == 0
    assert value(gauges, "stylequeue_workers", status="healthy") == 1
    assert value(gauges, "stylequeue_workers_slots", status="healthy") == 2


@pytest.mark.integration
@pytest.mark.slow
def test_every_metrics_port_needs_the_token(metrics_stack: MetricsStack) -> None:
    ms = metrics_stack
    for url in (ms.api, ms.worker, ms.dispatcher):
        assert httpx.get(url, timeout=10).status_code == 401, url
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401, url


# --- deploy/: the dashboard and the scrape config, against what the code exports ------------------------


def _sample_names(family: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {f"{family}_{s}" for s in ("bucket", "count", "sum")}
    return {family}


def every_exported_name(tmp_path: Path) -> set[str]:
    """Every sample name the API, the worker and the dispatcher can export (histograms: _bucket, ...)."""
    names: set[str] = set()
    for module in (api_metrics, worker_metrics):
        for metric in (v for v in vars(module).values() if isinstance(v, MetricWrapperBase)):
            for family in metric.describe():  # labelled ones have no sample until used
                names |= _sample_names(family.name, family.type)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(shared_metrics.JobsCollector(get_sessionmaker(url), lease_s=15))
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names |= _sample_names(family.name, family.type)  # (an empty database: no samples)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "stylequeue-dashboard.json").read_text())

    def targets(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []))
            yield from targets(panel.get("panels", []))

    return list(targets(dashboard["panels"]))


def test_the_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    used = {m for q in queries for m in re.findall(r"\bstylequeue_[a-z0-9_]+", q)}
    exported = every_exported_name(tmp_path)
    assert used - exported == set(), f"the dashboard queries metrics nothing exports: {used - exported}"
    for needed in (
        "stylequeue_jobs",  # queue depth
        "stylequeue_worker_jobs_total",  # throughput
        "stylequeue_worker_job_failures_total",  # failures
        "stylequeue_worker_gpu_memory_used_bytes",  # GPU use
        "stylequeue_api_request_duration_seconds_bucket",  # latency
    ):
        assert needed in used, needed
    assert any("histogram_quantile(0.99" in q and "stylequeue_api_request_duration" in q for q in queries)


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "stylequeue-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_the_scrape_config_covers_every_target_with_the_token() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    ports = {
        "api": "8000",
        "worker": compose["worker"]["environment"]["STYLEQUEUE_WORKER_METRICS_PORT"],
        "dispatcher": compose["dispatcher"]["environment"]["STYLEQUEUE_DISPATCHER_METRICS_PORT"],
    }
    for service, port in ports.items():
        job = jobs[f"stylequeue-{service}"]
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["credentials_file"] == "/run/metrics/token"
        sd = job["dns_sd_configs"][0]
        assert sd["names"] == [service] and str(sd["port"]) == port
        assert "STYLEQUEUE_METRICS_TOKEN" in compose[service]["environment"]
    prometheus = compose["prometheus"]
    assert "/run/metrics/token" in prometheus["command"][0] and "/run/metrics" in prometheus["tmpfs"]
    assert prometheus["profiles"] == ["monitoring"] and compose["grafana"]["profiles"] == ["monitoring"]
    assert "FLOWER_PASSWORD" in compose["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert not any(compose[s].get("ports") for s in ("flower", "prometheus", "grafana"))
