"""POST /v1/batches: product and pairs, JSON and multipart, 1,000 jobs at once, summaries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from sqlalchemy import func, select

from shared.db import session_scope
from shared.dispatch import MAX_PER_PASS
from shared.models import Job
from shared.settings import Settings
from tests.support.apps import Api, build_api, upload
from tests.support.images import image_bytes


def test_product_from_multipart_files(any_api: Api) -> None:
    files = [("content", (f"c{i}.png", image_bytes())) for i in range(3)]
    files += [("style", (f"s{i}.jpg", image_bytes(fmt="JPEG"))) for i in range(2)]
    r = any_api.client.post("/v1/batches", files=files, data={"params": '{"size": 256}'})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job_count"] == 6 and len(set(body["job_ids"])) == 6
    assert any_api.publisher.published == body["job_ids"]
    jobs = [any_api.client.get(f"/v1/jobs/{j}").json() for j in body["job_ids"]]
    pairs = {(j["content_id"], tuple(j["style_ids"])) for j in jobs}
    assert len(pairs) == 6 and all(len(j["style_ids"]) == 1 for j in jobs)
    assert all(j["batch_id"] == body["id"] and j["params"]["size"] == 256 for j in jobs)
    assert any_api.counts()["images"] == 5


def test_pairs_from_json_ids_with_a_blend(any_api: Api) -> None:
    c = [upload(any_api.client, image_bytes()).json()["id"] for _ in range(2)]
    s = [upload(any_api.client, image_bytes()).json()["id"] for _ in range(3)]
    r = any_api.client.post(
        "/v1/batches",
        json={
            "contents": c,
            "styles": s,
            "mode": "pairs",
            "pairs": [[0, 2], [1, 0]],
            "params": {"iterations": 10},
        },
    )
    assert r.status_code == 202, r.text
    jobs = [any_api.client.get(f"/v1/jobs/{j}").json() for j in r.json()["job_ids"]]
    assert [(j["content_id"], j["style_ids"]) for j in jobs] == [(c[0], [s[2]]), (c[1], [s[0]])]
    r = any_api.client.post(
        "/v1/batches",
        json={
            "contents": c,
            "styles": s,
            "mode": "pairs",
            "pairs": [[0, [0, 1]]],
            "params": {"style_weights": [0.3, 0.7]},
        },
    )
    assert r.status_code == 202, r.text
    job = any_api.client.get(f"/v1/jobs/{r.json()['job_ids'][0]}").json()
    assert job["style_ids"] == [s[0], s[1]]


def test_batch_summary_counts_and_progress(api: Api) -> None:
    from sqlalchemy import update

    c = upload(api.client, image_bytes()).json()["id"]
    batch = api.client.post("/v1/batches", json={"contents": [c] * 4, "styles": [c]}).json()
    a, b, _, _ = batch["job_ids"]
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == a).values(status="succeeded"))
        session.execute(update(Job).where(Job.id == b).values(status="running", progress={"fraction": 0.5}))
    got = api.client.get(f"/v1/batches/{batch['id']}").json()
    assert got["counts"] == {"queued": 2, "running": 1, "succeeded": 1, "failed": 0, "canceled": 0}
    assert got["progress"] == 0.375 and got["done"] is False
    assert got["job_ids"] == batch["job_ids"]  # submission order


def test_thousand_job_batch_on_postgresql(pg_api: Api) -> None:
    c = [upload(pg_api.client, image_bytes()).json()["id"] for _ in range(40)]
    s = [upload(pg_api.client, image_bytes()).json()["id"] for _ in range(25)]
    pg_api.client.post("/v1/batches", json={"contents": c[:1], "styles": s[:1]})  # warm up
    start = time.perf_counter()
    r = pg_api.client.post("/v1/batches", json={"contents": c, "styles": s})
    elapsed = time.perf_counter() - start
    assert r.status_code == 202, r.text
    assert r.json()["job_count"] == 1000 and len(set(r.json()["job_ids"])) == 1000
    assert elapsed < 2.0, f"1,000-job batch took {elapsed:.2f}s"
    with session_scope(pg_api.settings.database_url) as session:
        n = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == r.json()["id"], Job.published_at.is_not(None))
        )
    assert n == MAX_PER_PASS  # one dispatch pass publishes at most this many; the rest wait in the table
    summary = pg_api.client.get(f"/v1/batches/{r.json()['id']}").json()
    assert summary["counts"]["queued"] == 1000 and summary["job_count"] == 1000


def test_thousand_and_one_is_refused(settings_factory: Callable[..., Settings]) -> None:
    api = build_api(settings_factory())
    c = upload(api.client, image_bytes()).json()["id"]
    before = api.counts()
    r = api.client.post("/v1/batches", json={"contents": [c] * 1001, "styles": [c]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "batch_too_large"
    assert api.counts() == before
    r = api.client.post(
        "/v1/batches",
        data={"mode": "pairs", "pairs": json.dumps([[0, 0]])},
        files=[("content", ("a.png", image_bytes()))],
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_style"
