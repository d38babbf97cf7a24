"""The database stops under load: the API answers 503 with Retry-After (never 500, within seconds),
loses no accepted job and creates none it did not accept; /readyz names the database while it is down.

A real uvicorn server (thread) on a private PostgreSQL cluster (``private_pg``) and the real Redis
broker; submissions go over real HTTP from another thread while the cluster is stopped with
``pg_ctl -m immediate`` and started again.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from api.app import create_app
from api.publisher import CeleryPublisher
from shared.db import get_engine, session_scope
from shared.migrate import upgrade
from shared.models import Job
from shared.tenants import create_key
from tests.support.chaos_lib import PgCluster
from tests.support.images import image_bytes
from tests.support.servers import free_port
from tests.support.waiting import wait_for

FAST_503_S = 5.0  # a 503 must come within this, not after a long hang


@dataclass
class Answer:
    status: int
    seconds: float
    body: dict[str, Any]
    retry_after: str | None


@dataclass
class Live:
    base: str
    key: str
    app: FastAPI
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=20, headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture
def live(private_pg: PgCluster, redis_url: str, settings_factory: Any) -> Iterator[Live]:
    settings = settings_factory(database_url=private_pg.url, broker_url=redis_url)
    upgrade(private_pg.url)
    app = create_app(settings, publisher=CeleryPublisher(settings))
    with session_scope(private_pg.url) as session:
        key = create_key(session, "outage").key
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield Live(f"http://127.0.0.1:{port}", key, app, private_pg.url)
    server.should_exit = True
    thread.join(10)
    get_engine(private_pg.url).dispose()


def timed(call: Callable[[], httpx.Response]) -> Answer:
    """The answer and how long it took; status 0 when the server dropped the connection."""
    start = time.monotonic()
    try:
        r = call()
    except httpx.TransportError as exc:
        return Answer(0, time.monotonic() - start, {"transport_error": repr(exc)}, None)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return Answer(r.status_code, time.monotonic() - start, body, r.headers.get("retry-after"))


class Submitter(threading.Thread):
    """POSTs one job after another until stopped, recording every answer."""

    def __init__(self, live: Live) -> None:
        super().__init__(daemon=True)
        self.live = live
        self.answers: list[Answer] = []
        self.stop = threading.Event()

    def run(self) -> None:
        style = image_bytes()
        with self.live.client() as client:
            while not self.stop.is_set():
                files = [
                    ("content", ("c.png", image_bytes(), "image/png")),
                    ("style", ("s.png", style, "image/png")),
                ]
                self.answers.append(
                    timed(partial(client.post, "/v1/jobs", files=files, data={"params": '{"size": 128}'}))
                )

    def count(self, status: int) -> int:
        return sum(a.status == status for a in list(self.answers))


def assert_unavailable(answer: Answer, what: str) -> None:
    assert answer.status == 503, (what, answer)
    assert answer.body["error"]["code"] == "database_unavailable", (what, answer.body)
    assert answer.retry_after and int(answer.retry_after) > 0, what
    assert answer.seconds < FAST_503_S, (what, answer.seconds)


def check_endpoints_while_down(client: httpx.Client, job_id: str) -> list[Answer]:
    """Auth lookups, reads, cancel, uploads, batches, keyed submissions: all 503, none 500."""
    img = image_bytes()
    calls: dict[str, Callable[[], httpx.Response]] = {
        "list": lambda: client.get("/v1/jobs"),
        "read": lambda: client.get(f"/v1/jobs/{job_id}"),
        "cancel": lambda: client.post(f"/v1/jobs/{job_id}/cancel"),
        "batch": lambda: client.post("/v1/batches", json={"contents": ["a"], "styles": ["b"]}),
        "upload": lambda: client.post("/v1/images", files={"file": ("x.png", img, "image/png")}),
        "keyed": lambda: client.post(
            "/v1/jobs",
            headers={"Idempotency-Key": "k1"},
            files=[("content", ("c.png", img, "image/png")), ("style", ("s.png", img, "image/png"))],
        ),
        "bad_key": lambda: client.get("/v1/jobs", headers={"Authorization": "Bearer sq_nope"}),
    }
    answers = []
    for name, call in calls.items():
        answer = timed(call)
        assert_unavailable(answer, name)
        answers.append(answer)
    return answers


def check_readyz_down(client: httpx.Client) -> Answer:
    answer = timed(lambda: client.get("/readyz"))
    assert answer.status == 503 and answer.retry_after, answer
    assert answer.body["checks"]["database"].startswith("down"), answer.body
    assert answer.body["checks"]["broker"] == answer.body["checks"]["storage"] == "ok"
    assert "database" in answer.body["error"]["message"]
    return answer


class Submitters:
    """Several submitters at once, so that the stop also catches requests mid-transaction."""

    def __init__(self, live: Live, n: int) -> None:
        self.threads = [Submitter(live) for _ in range(n)]

    @property
    def answers(self) -> list[Answer]:
        return [a for t in self.threads for a in list(t.answers)]

    def count(self, status: int) -> int:
        return sum(t.count(status) for t in self.threads)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop_and_join(self) -> None:
        for t in self.threads:
            t.stop.set()
        for t in self.threads:
            t.join(30)


def test_database_outage_under_load(live: Live, private_pg: PgCluster) -> None:
    submitter = Submitters(live, 4)
    submitter.start()
    try:
        wait_for(lambda: submitter.count(202) >= 5, 15, "submissions before the outage")
        private_pg.stop("immediate")
        with live.client() as client:
            ok_id = next(a.body["id"] for a in submitter.answers if a.status == 202)
            ready = check_readyz_down(client)
            others = check_endpoints_while_down(client, ok_id)
            wait_for(lambda: submitter.count(503) >= 5, 15, "503s during the outage")
            private_pg.start()
            wait_for(lambda: client.get("/readyz").status_code == 200, 20, "readyz 200 again")
            after = submitter.count(202)
            wait_for(lambda: submitter.count(202) >= after + 5, 15, "submissions after it")
    finally:
        submitter.stop_and_join()
    indoubt = live.app.state.indoubt
    wait_for(lambda: indoubt.pending() == 0, 15, "in-doubt submissions resolved")

    answers = submitter.answers
    assert {a.status for a in answers} == {202, 503}, sorted({a.status for a in answers})
    for a in answers:
        if a.status == 503:
            assert_unavailable(a, "submission")
    accepted = {a.body["id"] for a in answers if a.status == 202}
    assert len(accepted) == sum(a.status == 202 for a in answers)
    with session_scope(live.url) as session:
        stored = set(session.scalars(select(Job.id)))
    assert accepted - stored == set(), "a job answered 202 was lost"
    assert stored - accepted == set(), "a failed submission left a job behind"

    down = [a.seconds for a in answers if a.status == 503] + [a.seconds for a in others]
    print(
        f"\nsubmissions={len(answers)} accepted={len(accepted)} "
        f"refused={sum(a.status == 503 for a in answers)} "
        f"503 latency median={statistics.median(down) * 1000:.1f}ms "
        f"max={max(down) * 1000:.1f}ms readyz_down={ready.seconds * 1000:.1f}ms"
    )


def test_unresponsive_database_answers_503_within_the_connect_timeout(
    settings_factory: Any,
) -> None:
    """A server that accepts TCP but never speaks (a hung host): 503 after the connect timeout,
    not a hang."""
    import socket

    from fastapi.testclient import TestClient

    from shared.db import CONNECT_TIMEOUT_S
    from tests.support.apps import FakePublisher

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever answers
        port = silent.getsockname()[1]
        url = f"postgresql+psycopg://x@127.0.0.1:{port}/x"
        app = create_app(settings_factory(database_url=url), publisher=FakePublisher(), migrate=False)
        client = TestClient(app, raise_server_exceptions=False)
        answer = timed(lambda: client.get("/v1/jobs", headers={"Authorization": "Bearer sq_x"}))
        get_engine(url).dispose()
    assert_unavailable(answer, "silent server")
    assert CONNECT_TIMEOUT_S - 0.5 <= answer.seconds < CONNECT_TIMEOUT_S + 2, answer.seconds
    print(f"\nsilent database: 503 after {answer.seconds:.2f}s")
