"""GET /metrics on the API: hidden without a token setting, 401 without the token, and counters that
move with requests (route templates as labels, submissions and the jobs they created, error codes)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import Settings
from tests.support.apps import Api, build_api, submit, upload
from tests.support.images import image_bytes

TOKEN = "metrics-token-" + "x" * 32
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def api(settings_factory: Callable[..., Settings]) -> Api:
    return build_api(settings_factory(metrics_token=TOKEN))


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_is_404_without_a_token_setting(settings_factory: Callable[..., Settings]) -> None:
    api = build_api(settings_factory())
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
        r = api.client.get("/metrics", headers=headers)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
        assert "stylequeue_api" not in r.text


@pytest.mark.parametrize(
    "authorization",
    [None, f"Basic {TOKEN}", "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer"],
)
def test_metrics_needs_the_token(api: Api, authorization: str | None) -> None:
    client = TestClient(api.client.app)  # no tenant key: /metrics is not a tenant's route
    headers = {} if authorization is None else {"Authorization": authorization}
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert "stylequeue_api" not in r.text


def test_a_tenant_key_is_not_the_metrics_token(api: Api) -> None:
    assert api.client.get("/metrics").status_code == 401  # api.client sends the tenant's key


def test_request_counter_and_latency_use_the_route_template(api: Api) -> None:
    missing = str(uuid.uuid4())
    before = scrape(api.client)
    for _ in range(3):
        assert api.client.get(f"/v1/jobs/{missing}").status_code == 404
    assert api.client.get("/no/such/path").status_code == 404
    after = scrape(api.client)
    labels = {"route": "/v1/jobs/{job_id}", "method": "GET"}
    name = "stylequeue_api_requests_total"
    assert value(after, name, **labels, status="404") - value(before, name, **labels, status="404") == 3
    other = {"route": "other", "method": "GET", "status": "404"}
    assert value(after, name, **other) - value(before, name, **other) == 1
    count = "stylequeue_api_request_duration_seconds_count"
    assert value(after, count, **labels) - value(before, count, **labels) == 3
    # never the raw path: the label set stays bounded whatever clients ask for
    assert not [key for key in after if any(missing in v or "/no/such" in v for _, v in key[1])]


def test_odd_methods_are_other(api: Api) -> None:
    before = scrape(api.client)
    assert api.client.request("BREW", "/healthz").status_code == 405
    after = scrape(api.client)
    labels = {"route": "/healthz", "method": "other", "status": "405"}
    assert value(after, "stylequeue_api_requests_total", **labels) == (
        value(before, "stylequeue_api_requests_total", **labels) + 1
    )


def test_rejections_are_counted_by_error_code(api: Api) -> None:
    before = scrape(api.client)
    bad = submit(api.client, content=b"not an image", styles=[image_bytes()])
    assert bad.status_code in (400, 415, 422), bad.text
    code = bad.json()["error"]["code"]
    unauthorized = TestClient(api.client.app).get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401
    after = scrape(api.client)
    name = "stylequeue_api_rejections_total"
    assert value(after, name, code=code) - value(before, name, code=code) == 1
    auth_code = unauthorized.json()["error"]["code"]
    assert value(after, name, code=auth_code) - value(before, name, code=auth_code) == 1
    status = str(bad.status_code)
    requests = {"route": "/v1/jobs", "method": "POST", "status": status}
    assert value(after, "stylequeue_api_requests_total", **requests) == (
        value(before, "stylequeue_api_requests_total", **requests) + 1
    )
    assert value(after, "stylequeue_api_submissions_total", kind="job") == value(
        before, "stylequeue_api_submissions_total", kind="job"
    )


def test_submissions_and_created_jobs_are_counted_once(api: Api) -> None:
    before = scrape(api.client)
    job = submit(
        api.client, content=image_bytes(), styles=[image_bytes()], params={"size": 64, "min_size": 32}
    )
    assert job.status_code == 202, job.text
    contents = [upload(api.client, image_bytes()).json()["id"] for _ in range(3)]
    style = upload(api.client, image_bytes()).json()["id"]
    body = {"contents": contents, "styles": [style], "params": {"size": 64, "min_size": 32}}
    headers = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    batch = api.client.post("/v1/batches", json=body, headers=headers)
    assert batch.status_code == 202 and batch.json()["job_count"] == 3, batch.text
    replay = api.client.post("/v1/batches", json=body, headers=headers)  # creates nothing
    assert replay.status_code == 202 and replay.headers.get("idempotent-replayed") == "true"
    after = scrape(api.client)

    def delta(name: str, kind: str) -> float:
        return value(after, name, kind=kind) - value(before, name, kind=kind)

    assert delta("stylequeue_api_submissions_total", "job") == 1
    assert delta("stylequeue_api_jobs_created_total", "job") == 1
    assert delta("stylequeue_api_submissions_total", "batch") == 1
    assert delta("stylequeue_api_jobs_created_total", "batch") == 3
    accepted = {"route": "/v1/batches", "method": "POST", "status": "202"}
    assert value(after, "stylequeue_api_requests_total", **accepted) == (
        value(before, "stylequeue_api_requests_total", **accepted) + 2
    )


def test_the_scrape_itself_is_counted_and_in_flight_settles(api: Api) -> None:
    first = scrape(api.client)
    second = scrape(api.client)
    labels = {"route": "/metrics", "method": "GET", "status": "200"}
    assert value(second, "stylequeue_api_requests_total", **labels) == (
        value(first, "stylequeue_api_requests_total", **labels) + 1
    )
    assert value(second, "stylequeue_api_requests_in_flight") == 1  # the scrape being answered
