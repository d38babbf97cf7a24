"""Webhooks with real processes: the API, ``stylequeue worker --cpu``, ``stylequeue dispatch`` and
``stylequeue webhooks`` (the sender), on a fresh PostgreSQL database and Redis, delivering to a real
receiver on loopback (allow-listed) that verifies every signature with the ``standardwebhooks``
library, answers 500s and hangs (the sender's timeout), and sees the sender ``kill -9``-ed mid-delivery.

Every event is delivered under ONE id (retries and redeliveries repeat it, with the same bytes), and
every job of a batch gets its signed ``completed`` event, plus one ``batch.completed``.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.images import image_bytes
from tests.support.receiver import HANG, Delivery, Receiver
from tests.support.servers import REDIS_HOST, REDIS_PORT, port_open, require, temporary_database
from tests.support.stacks import FAST_TIMING, Stack, make_key, stack_env, stack_settings, start
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 2}
TIMING = {
    **FAST_TIMING,
    "webhook_allow_hosts": "127.0.0.1",
    "webhook_timeout_s": 1.5,  # a hanging receiver: the attempt fails after this (lease: 13 s)
    "webhook_backoff_s": 0.2,
    "webhook_backoff_max_s": 1.0,
}


@dataclass
class HookStack:
    stack: Stack

    def start_sender(self) -> None:
        log = self.stack.log_of("webhooks")
        if log.exists():
            log.write_text(log.read_text().replace(" ready.", " was ready."))
        proc = start(["webhooks", "--loglevel", "info"], self.stack.env, log)
        self.stack.procs["webhooks"] = proc
        wait_for(lambda: proc.poll() is not None or " ready." in log.read_text(), 60, "the webhook sender")
        assert proc.poll() is None, self.stack.log_tail(name="webhooks")

    def kill_sender(self) -> None:
        proc = self.stack.procs.pop("webhooks")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.stack.api_url, headers={"Authorization": f"Bearer {self.stack.key}"}, timeout=30
        )

    def secret(self) -> str:
        with self.http() as c:
            return str(c.get("/v1/webhooks/secret").json()["secret"])

    def submit(self, contents: int, styles: int, webhook: str) -> dict[str, Any]:
        with self.http() as c:
            ids = [
                c.post("/v1/images", files={"file": (f"i{i}.png", image_bytes(32, 32), "image/png")}).json()[
                    "id"
                ]
                for i in range(contents + styles)
            ]
            r = c.post(
                "/v1/batches",
                json={
                    "contents": ids[:contents],
                    "styles": ids[contents:],
                    "params": TINY,
                    "webhook": webhook,
                },
            )
            assert r.status_code == 202, r.text
            return dict(r.json())

    def tails(self) -> str:
        names = ("webhooks", "dispatch", "worker")
        return "\n".join(f"--- {n} ---\n{self.stack.log_tail(30, name=n)}" for n in names)


@pytest.fixture(scope="module")
def hooks(_redis_db: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HookStack]:
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    from shared.migrate import upgrade

    tmp = tmp_path_factory.mktemp("webhook-stack")
    with temporary_database("sq_webhooks") as db_url:
        env = stack_env(
            tmp,
            database_url=db_url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{_redis_db}",
            queue_name=f"sq-hooks-{uuid.uuid4().hex[:8]}",
            **TIMING,
        )
        stack = Stack("webhooks", env, stack_settings(env), tmp)
        upgrade(stack.settings.database_url)
        hs = HookStack(stack)
        try:
            stack.start_worker()
            stack.procs["dispatch"] = start(["dispatch", "--interval", "0.5"], env, stack.log_of("dispatch"))
            hs.start_sender()
            stack.start_api()
            stack.key = make_key(stack.settings)
            yield hs
        finally:
            stack.close()


def _by_id(deliveries: list[Delivery]) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        out[d.id].append(d)
    return out


def _delivered(deliveries: list[Delivery], event: str) -> set[str]:
    """Ids of ``event`` events answered 2xx."""
    return {d.id for d in deliveries if d.event == event and 200 <= d.answered < 300}


def _wait_batch_delivered(hooks: HookStack, receiver: Receiver, jobs: set[str]) -> list[Delivery]:
    """Every job's completed event and the batch's batch.completed answered 200: the deliveries."""

    def done(ds: list[Delivery]) -> bool:
        finished = {d.body.get("id") for d in ds if d.event == "completed" and d.answered == 200}
        return finished >= jobs and bool(_delivered(ds, "batch.completed"))

    try:
        return receiver.wait_for(done, 120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{hooks.tails()}") from None


def _check_one_id_per_event(deliveries: list[Delivery]) -> None:
    assert all(d.verified for d in deliveries), [d.id for d in deliveries if not d.verified]
    for event_id, copies in _by_id(deliveries).items():
        assert len({c.raw for c in copies}) == 1, f"{event_id}: retries sent different bodies"
        assert len({c.event for c in copies}) == 1
    jobs = defaultdict(set)
    for d in deliveries:
        if d.event == "completed":
            jobs[d.body["id"]].add(d.id)
    assert all(len(ids) == 1 for ids in jobs.values()), jobs  # one id per job's completed event


def test_a_batch_gets_signed_completed_events_through_500s_and_timeouts(hooks: HookStack) -> None:
    receiver = Receiver(hooks.secret, script=[500, HANG, 500]).start()
    try:
        batch = hooks.submit(2, 2, receiver.url)
        jobs = set(batch["job_ids"])
        got = _wait_batch_delivered(hooks, receiver, jobs)
        _check_one_id_per_event(got)
        completed = [d for d in got if d.event == "completed"]
        assert {d.body["id"] for d in completed} == jobs
        assert all(d.body["status"] == "succeeded" and d.body["result_url"] for d in completed)
        assert len({d.id for d in completed}) == 4
        assert [d.answered for d in got[:3]] == [500, HANG, 500]  # the retries were seen
        (batch_done,) = {d.id for d in got if d.event == "batch.completed"}
        body = next(d.body for d in got if d.id == batch_done)
        assert body["id"] == batch["id"] and body["done"] is True and body["counts"]["succeeded"] == 4
        with hooks.http() as c:
            hanging = next(d for d in got if d.answered == HANG).body["id"]
            attempts = c.get(f"/v1/jobs/{hanging}/webhooks").json()["items"]
        assert any(a["error"] and "timeout" in a["error"] for a in attempts), attempts
    finally:
        receiver.stop()


def test_a_sender_killed_mid_delivery_loses_nothing_and_repeats_the_same_id(hooks: HookStack) -> None:
    receiver = Receiver(hooks.secret, script=[HANG]).start()
    try:
        batch = hooks.submit(3, 1, receiver.url)
        jobs = set(batch["job_ids"])
        receiver.wait_for(lambda ds: any(d.answered == HANG for d in ds), 90)
        hooks.kill_sender()  # mid-delivery: the receiver holds its request
        hooks.start_sender()
        got = _wait_batch_delivered(hooks, receiver, jobs)
        _check_one_id_per_event(got)
        killed = next(d for d in got if d.answered == HANG)
        again = [d for d in got if d.id == killed.id and d.answered == 200]
        assert again and again[0].raw == killed.raw  # redelivered under the same id, same bytes
        assert len({d.id for d in got if d.event == "completed"}) == 3
    finally:
        receiver.stop()
