"""Live events (``GET /v1/jobs/{id}/events``, ``GET /v1/batches/{id}/events``) over a real uvicorn
server in a thread: the test plays the worker, writing the job rows between the events it reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import update

from api.client import StyleQueueClient
from api.events import JobView, SseEvent, SseParser, stream_slots
from api.presenters import Linker
from api.routes.events import BatchWatch, JobWatch, renderer
from shared.db import get_sessionmaker, session_scope
from shared.models import Job, utcnow
from shared.settings import Settings
from tests.support.apps import Api, build_api, submit
from tests.support.images import image_bytes
from tests.support.servers import free_port
from tests.support.waiting import wait_for

FAST = {"events_poll_s": 0.05}
RUNNING = {"status": "running", "attempt": 1, "worker": "w@test"}


@dataclass
class Live:
    url: str
    api: Api

    @property
    def key(self) -> str:
        return self.api.key

    @property
    def app(self) -> FastAPI:
        app = self.api.client.app
        assert isinstance(app, FastAPI)
        return app

    @contextmanager
    def stream(
        self, path: str, key: str | None = None, last_id: str | None = None
    ) -> Iterator[tuple[httpx.Response, Iterator[SseEvent]]]:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        with (
            httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0)) as http,
            http.stream("GET", path, headers=headers) as resp,
        ):
            yield resp, _events(resp, SseParser())

    def read_all(self, path: str, **kwargs: Any) -> list[SseEvent]:
        with self.stream(path, **kwargs) as (resp, events):
            assert resp.status_code == 200, resp.read()
            return list(events)

    def job(self) -> str:
        r = submit(self.api.client, content=image_bytes(), styles=[image_bytes()])
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def batch(self, n: int) -> tuple[str, list[str]]:
        files = [("content", (f"c{i}.png", image_bytes())) for i in range(n)]
        r = self.api.client.post("/v1/batches", files=[*files, ("style", ("s.png", image_bytes()))])
        assert r.status_code == 202, r.text
        return str(r.json()["id"]), list(r.json()["job_ids"])

    def write(self, job_id: str, **values: Any) -> None:
        with session_scope(self.api.settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))


def _events(resp: httpx.Response, parser: SseParser) -> Iterator[SseEvent]:
    for line in resp.iter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


def checkpoint(job_id: str, seq: int) -> dict[str, Any]:
    key = f"jobs/{job_id}/checkpoints/{seq}"
    return {
        "key": f"{key}.pt",
        "preview_key": f"{key}.png",
        "scale": 0,
        "iteration": seq,
        "step": seq,
        "seq": seq,
    }


def finished(job_id: str) -> dict[str, Any]:
    return {"status": "succeeded", "result_key": f"jobs/{job_id}/result.png", "finished_at": utcnow()}


@pytest.fixture
def serve(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., Live]]:
    """``serve(**settings)``: the app on a free port of 127.0.0.1 (stopped after the test)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> Live:
        api = build_api(settings_factory(**{**FAST, **overrides}))
        port = free_port()
        config = uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, 10, "the server", interval=0.01)
        return Live(f"http://127.0.0.1:{port}", api)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: the embedded SQLite; else the test PostgreSQL (skips without one)."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def test_a_job_from_queued_to_succeeded(serve: Callable[..., Live], database_url: str | None) -> None:
    live = serve(database_url=database_url)
    job_id = live.job()
    with live.stream(f"/v1/jobs/{job_id}/events") as (resp, events):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        first = next(events)
        assert (first.event, first.json()["status"], first.json()["id"]) == ("status", "queued", job_id)
        assert first.json()["queue"] is not None  # the same JSON as GET /v1/jobs/{id}
        live.write(job_id, **RUNNING, started_at=utcnow())
        running = next(events)
        assert (running.event, running.json()["status"]) == ("status", "running")
        live.write(job_id, progress={"scale": 0, "scales": 2, "iteration": 5, "fraction": 0.25, "loss": 3.5})
        progress = next(events)
        assert progress.event == "progress" and progress.json()["progress"]["iteration"] == 5
        assert progress.json()["progress"]["loss"] == 3.5
        live.write(job_id, checkpoints=[checkpoint(job_id, 0)])
        ckpt = next(events)
        assert ckpt.event == "checkpoint"
        assert ckpt.json()["checkpoints"][-1]["preview_url"] == f"/v1/jobs/{job_id}/checkpoints/0/preview"
        live.write(job_id, **finished(job_id))
        done = next(events)
        assert (done.event, done.json()["status"]) == ("completed", "succeeded")
        assert done.json()["result_url"] == f"/v1/jobs/{job_id}/result"
        assert list(events) == []  # the stream ended
    ids = [e.id for e in (first, running, progress, ckpt, done)]
    assert all(ids) and len(set(ids)) == 5
    assert wait_for(lambda: stream_slots(live.app).open(_tenant(live, job_id)) == 0, 5, "release")


def _tenant(live: Live, job_id: str) -> str:
    with session_scope(live.api.settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.tenant_id


def test_last_event_id_skips_what_the_client_saw(serve: Callable[..., Live]) -> None:
    live = serve(events_max_duration_s=0.5)  # a stream with nothing new ends on its own
    job_id = live.job()
    live.write(job_id, **RUNNING, progress={"iteration": 1})
    path = f"/v1/jobs/{job_id}/events"
    [seen] = live.read_all(path)
    assert seen.event == "status" and seen.id
    assert live.read_all(path, last_id=seen.id) == []  # nothing new since
    live.write(job_id, progress={"iteration": 2})
    [newer] = live.read_all(path, last_id=seen.id)
    assert newer.event == "progress" and newer.json()["progress"]["iteration"] == 2
    live.write(job_id, checkpoints=[checkpoint(job_id, 0)], progress={"iteration": 3})
    [ckpt] = live.read_all(path, last_id=newer.id)
    assert ckpt.event == "checkpoint"
    assert [e.event for e in live.read_all(path, last_id="garbage")] == ["status"]  # not ours: a snapshot
    live.write(job_id, **finished(job_id))
    assert [e.event for e in live.read_all(path, last_id=ckpt.id)] == ["completed"]


def test_a_finished_job_sends_one_completed_event(serve: Callable[..., Live]) -> None:
    live = serve()
    job_id = live.job()
    live.write(
        job_id, status="failed", error_code="out_of_memory", error_message="too big", finished_at=utcnow()
    )
    events = live.read_all(f"/v1/jobs/{job_id}/events")
    assert [(e.event, e.json()["status"]) for e in events] == [("completed", "failed")]
    assert events[0].json()["error"]["code"] == "out_of_memory"
    again = live.read_all(f"/v1/jobs/{job_id}/events", last_id=events[0].id)  # even when resumed
    assert [e.event for e in again] == ["completed"]


def test_another_tenants_job_or_batch_is_not_found(serve: Callable[..., Live]) -> None:
    live = serve()
    job_id = live.job()
    batch_id, _ = live.batch(1)
    other = live.api.as_tenant("mallory").headers["Authorization"].split()[1]
    for path in (f"/v1/jobs/{job_id}/events", f"/v1/batches/{batch_id}/events", "/v1/jobs/nope/events"):
        with live.stream(path, key=other) as (resp, _events):
            assert resp.status_code == 404
            assert resp.read() and resp.json()["error"]["code"] in ("job_not_found", "batch_not_found")
    with live.stream(f"/v1/jobs/{job_id}/events", key="sq_wrong") as (resp, _events):
        assert resp.status_code == 401


def test_too_many_streams_is_429_until_one_closes(serve: Callable[..., Live]) -> None:
    live = serve(events_max_streams=2)
    job_id = live.job()
    path = f"/v1/jobs/{job_id}/events"
    with live.stream(path) as (first, events1), live.stream(path) as (second, events2):
        assert (first.status_code, second.status_code) == (200, 200)
        assert next(events1).event == next(events2).event == "status"
        with live.stream(path) as (third, _events):
            assert third.status_code == 429 and third.headers["retry-after"]
            assert third.read() and third.json()["error"]["code"] == "too_many_streams"
        bob = live.api.as_tenant("bob")
        bobs_job = submit(bob, content=image_bytes(), styles=[image_bytes()]).json()["id"]
        key = bob.headers["Authorization"].split()[1]
        with live.stream(f"/v1/jobs/{bobs_job}/events", key=key) as (bobs, events3):
            assert bobs.status_code == 200 and next(events3).event == "status"  # slots are per tenant
    slots = stream_slots(live.app)
    wait_for(lambda: slots.open(_tenant(live, job_id)) == 0, 5, "the closed streams to free their slots")
    with live.stream(path) as (again, events):
        assert again.status_code == 200 and next(events).event == "status"


def test_the_initial_request_is_rate_limited(serve: Callable[..., Live]) -> None:
    live = serve(rate_limit="4/minute")
    job_id = live.job()  # one request (GET /v1/images is not sent: a multipart upload)
    live.write(job_id, **finished(job_id))
    path = f"/v1/jobs/{job_id}/events"
    codes = []
    for _ in range(4):
        with live.stream(path) as (resp, events):
            codes.append(resp.status_code)
            list(events)
    assert codes == [200, 200, 200, 429]


def test_a_stream_ends_after_its_lifetime_with_keepalives(
    serve: Callable[..., Live], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.events.KEEPALIVE_S", 0.1)
    live = serve(events_max_duration_s=1.0)
    job_id = live.job()
    started = time.monotonic()
    with live.stream(f"/v1/jobs/{job_id}/events") as (resp, _events):
        lines = list(resp.iter_lines())
    assert time.monotonic() - started >= 1.0
    assert lines[0] == "retry: 2000" and ": ping" in lines
    assert [line for line in lines if line.startswith("event:")] == ["event: status"]


def test_a_batch_stream(serve: Callable[..., Live], database_url: str | None) -> None:
    live = serve(database_url=database_url)
    batch_id, job_ids = live.batch(2)
    a, b = job_ids
    with live.stream(f"/v1/batches/{batch_id}/events") as (resp, events):
        assert resp.status_code == 200
        snapshot = [next(events) for _ in range(3)]
        assert [e.event for e in snapshot] == ["status", "status", "batch"]
        assert {e.json()["id"] for e in snapshot[:2]} == {a, b}
        assert snapshot[2].json()["counts"]["queued"] == 2 and snapshot[2].json()["done"] is False
        live.write(a, **RUNNING, progress={"fraction": 0.5})
        changed = [next(events), next(events)]
        assert [(e.event, e.json().get("status")) for e in changed] == [
            ("status", "running"),
            ("batch", None),
        ]
        assert changed[0].json()["id"] == a and changed[1].json()["counts"]["running"] == 1
        live.write(a, progress={"fraction": 0.75})
        progress = next(events)
        assert (progress.event, progress.json()["id"]) == ("progress", a)  # counts unchanged: no batch event
        live.write(a, **finished(a))
        live.write(b, status="canceled", finished_at=utcnow())
        rest = list(events)
    assert [e.event for e in rest][-2:] == ["batch", "completed"]
    assert {e.json()["id"] for e in rest if e.event == "status"} == {a, b}
    summary = rest[-1].json()
    assert summary["done"] and summary["counts"]["succeeded"] == 1 and summary["counts"]["canceled"] == 1
    resumed = live.read_all(f"/v1/batches/{batch_id}/events", last_id=rest[-1].id)
    # a finished batch ends at once; jobs updated within RESUME_MARGIN_US of the id are sent again
    assert [e.event for e in resumed][-2:] == ["batch", "completed"]


def test_a_batch_stream_resumes_with_the_jobs_updated_since(
    settings_factory: Callable[..., Settings],
) -> None:
    api = build_api(settings_factory())
    live = Live("", api)
    batch_id, (a, b) = live.batch(2)
    old = utcnow() - timedelta(hours=1)
    live.write(a, updated_at=old - timedelta(minutes=1))  # older than the margin before b's
    live.write(b, updated_at=old)
    watch = _batch_watch(api, _tenant(live, a), batch_id)
    assert watch.poll()[0]
    live.write(b, **RUNNING)
    resumed = _batch_watch(api, _tenant(live, a), batch_id, resume_from=watch.watermark)
    frames, done = resumed.poll()
    shown = "".join(frames)
    assert not done and b in shown and a not in shown  # a was not updated since: not sent again
    assert frames[-1].startswith("event: batch") and f"id: {resumed.watermark}" in frames[-1]


def _batch_watch(api: Api, tenant: str, batch_id: str, resume_from: int | None = None) -> BatchWatch:
    render = renderer(Linker(None, api.settings, api.storage), tenant)
    sessions = get_sessionmaker(api.settings.database_url)
    return BatchWatch(
        sessions, tenant, batch_id, render, max_jobs=api.settings.max_batch_jobs, resume_from=resume_from
    )


def test_progress_written_many_times_between_two_polls_is_one_event(
    settings_factory: Callable[..., Settings],
) -> None:
    api = build_api(settings_factory())
    live = Live("", api)
    job_id = live.job()
    tenant = _tenant(live, job_id)
    render = renderer(Linker(None, api.settings, api.storage), tenant)
    watch = JobWatch(get_sessionmaker(api.settings.database_url), tenant, job_id, render, None)
    live.write(job_id, **RUNNING)
    assert len(watch.poll()[0]) == 1
    for i in range(20):
        live.write(job_id, progress={"iteration": i, "fraction": i / 20})
    frames, done = watch.poll()
    assert len(frames) == 1 and frames[0].startswith("event: progress") and '"iteration":19' in frames[0]
    assert watch.poll() == ([], False)  # nothing new
    live.write(job_id, heartbeat_at=utcnow())  # a heartbeat moves updated_at, shows nothing new
    assert watch.poll() == ([], False)


def test_event_ids_name_the_view() -> None:
    view = JobView("running", 2, True, "-", "0123abcd", version=17)
    assert JobView.parse(view.event_id) == view and view.event_id.startswith("17.running.2.1.")
    for bad in (
        "",
        "17",
        "x" * 300,
        "17.zombie.2.1.-.0123abcd",
        "17.running.2.1.-.XYZ",
        "²7.running.2.1.-.0123abcd",
    ):
        assert JobView.parse(bad) is None


def test_the_parser_follows_the_standard() -> None:
    parser = SseParser()
    lines = [
        ": a comment",
        "retry: 1500",
        "event: progress",
        "id: 7",
        "data: {",
        'data:  "a": 1',
        "data:}",
        "",
        "",
    ]
    lines += ["data", "", "id: 8", "unknown: x", "event: status", "data: x", ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events[0] == SseEvent("progress", '{\n "a": 1\n}', "7") and events[0].json() == {"a": 1}
    assert events[1] == SseEvent("message", "", "7")  # the last id carries over
    assert events[2] == SseEvent("status", "x", "8")
    assert parser.retry_ms == 1500 and len(events) == 3


def test_the_client_follows_a_job_across_streams(
    serve: Callable[..., Live], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.events.RETRY_MS", 50)
    live = serve(events_max_duration_s=0.3)  # the server ends each stream quickly: the client resumes
    job_id = live.job()
    seen: list[str] = []
    with StyleQueueClient(live.url, live.key) as client:
        for event in client.job_events(job_id):
            seen.append(event.event)
            if event.event == "status" and event.json()["status"] == "queued":
                live.write(job_id, **RUNNING)
            elif event.event == "status":
                live.write(job_id, **finished(job_id))
    assert seen == ["status", "status", "completed"]


def test_the_client_polls_a_server_without_the_events_route(serve: Callable[..., Live]) -> None:
    live = serve()
    app = live.app
    app.router.routes = [r for r in app.router.routes if not getattr(r, "path", "").endswith("/events")]
    batch_id, (job_id,) = live.batch(1)
    with StyleQueueClient(live.url, live.key, poll_s=0.01) as client:
        events = client.batch_events(batch_id)
        assert [next(events).event, next(events).event] == ["status", "batch"]
        live.write(job_id, **finished(job_id))
        rest = [e.event for e in events]
    assert rest == ["status", "batch", "completed"]
