"""Webhook delivery figures for 1,000 completions, measured on real processes (not a test):

    .venv/bin/python bench/webhooks.py [--jobs 1000] [--concurrency 8] [--per-commit 20]

A fresh PostgreSQL database, the local Redis, ``stylequeue dispatch`` (its default 2 s pass) and
``stylequeue webhooks`` (``--concurrency`` delivering threads), and a receiver on loopback
(tests/support/receiver.py: it verifies every signature with the ``standardwebhooks`` library and
answers 200). The bench ends ``--jobs`` jobs that have a webhook, ``--per-commit`` per transaction
(as workers finishing jobs do, through shared.jobstore, each end writing its outbox row), in two
phases side by side:

* after-commit: the ending process publishes its events right after its commit (what a GPU worker
  does, ``shared.webhooks.publish_after_commit``);
* dispatcher: nothing is published by the ender; the dispatcher's pass finds the events due (what
  happens to an event whose publish was lost, or written by a process that cannot publish).

For each: deliveries per second (events / (last arrival - first commit)), and the delivery latency
of each event (its arrival at the receiver - its outbox row's ``created_at``), median, p99 and max.
Every delivery must verify and every event arrive exactly once (no retries: the receiver answers 200).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from shared import jobstore, webhook_secrets, webhooks  # noqa: E402
from shared.db import get_sessionmaker  # noqa: E402
from shared.jobstore import JobSpec  # noqa: E402
from shared.migrate import upgrade  # noqa: E402
from shared.models import StoredImage, Tenant, WebhookEvent  # noqa: E402
from shared.queue import make_celery, publish_many, webhook_queue  # noqa: E402
from tests.support.receiver import Receiver  # noqa: E402
from tests.support.servers import REDIS_HOST, REDIS_PORT, temporary_database  # noqa: E402
from tests.support.stacks import Stack, stack_env, stack_settings, start, stop  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

IMAGE = "b" * 64


def _seed(url: str, jobs: int, hook: str) -> list[str]:
    with get_sessionmaker(url)() as s:
        s.add(Tenant(id="bench", name="bench"))
        s.add(StoredImage(id=IMAGE, format="PNG", width=8, height=8, bytes=1, storage_key="k"))
        webhook_secrets.get(s, "bench")
        s.commit()
    return _reseed(url, jobs, hook)


def _end_all(url: str, ids: list[str], per_commit: int) -> float:
    """Cancel every job (each end writes its ``completed`` event), ``per_commit`` per transaction;
    returns the wall time of the first commit."""
    sessions = get_sessionmaker(url)
    first = 0.0
    for i in range(0, len(ids), per_commit):
        with sessions() as s:
            for job_id in ids[i : i + per_commit]:
                jobstore.request_cancel(s, "bench", job_id)
            s.commit()
        first = first or time.time()
    return first


def _phase(name: str, url: str, receiver: Receiver, jobs: int, per_commit: int) -> dict[str, Any]:
    ids = _seed(url, jobs, receiver.url) if name == "after-commit" else _reseed(url, jobs, receiver.url)
    already = len(receiver.deliveries)
    first = _end_all(url, ids, per_commit)
    got = receiver.wait_for(lambda ds: len(ds) - already >= jobs, 600)[already:]
    with get_sessionmaker(url)() as s:
        created = {
            i: c.timestamp()
            for i, c in s.execute(
                select(WebhookEvent.id, WebhookEvent.created_at).where(WebhookEvent.job_id.in_(ids))
            )
        }
    latencies = sorted((d.wall - created[d.id]) * 1000 for d in got)
    span = max(d.wall for d in got) - first
    return {
        "phase": name,
        "events": len(got),
        "distinct": len({d.id for d in got}),
        "verified": all(d.verified for d in got),
        "per_s": len(got) / span,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
        "max_ms": latencies[-1],
    }


def _reseed(url: str, jobs: int, hook: str) -> list[str]:
    """``jobs`` queued jobs of the bench's tenant with this webhook."""
    with get_sessionmaker(url)() as s:
        ids = jobstore.insert_queued(
            s,
            tenant_id="bench",
            batch_id=None,
            specs=[JobSpec(IMAGE, (IMAGE,))] * jobs,
            params={},
            max_attempts=3,
            webhook=hook,
        )
        s.commit()
    return ids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--per-commit", type=int, default=20)
    args = p.parse_args()
    tmp = Path(f"/tmp/sq-bench-webhooks-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    with temporary_database("sq_bench_hooks") as url:
        env = stack_env(
            tmp,
            database_url=url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/15",
            webhook_allow_hosts="127.0.0.1",
            webhook_concurrency=args.concurrency,
        )
        stack = Stack("bench", env, stack_settings(env), tmp)
        upgrade(url)
        receiver = Receiver(lambda: _secret(url)).start()
        procs = [
            start(["dispatch"], env, tmp / "dispatch.log"),
            start(["webhooks"], env, tmp / "webhooks.log"),
        ]
        try:
            wait_for(lambda: " ready." in (tmp / "webhooks.log").read_text(), 60, "the sender")
            print(
                f"webhooks: {args.jobs} completions per phase, {args.per_commit} per commit, "
                f"{args.concurrency} delivering threads, "
                f"dispatcher pass {stack.settings.dispatch_interval_s}s"
            )
            app = make_celery(stack.settings)
            hook_ids = get_sessionmaker(url)
            webhooks.publish_after_commit(
                hook_ids, lambda ids: publish_many(app, ids, webhooks_to=webhook_queue(stack.settings))
            )
            rows = [_phase("after-commit", url, receiver, args.jobs, args.per_commit)]
            # the dispatcher only: a second sessionmaker (no listener) ends the next jobs
            get_sessionmaker.cache_clear()
            rows.append(_phase("dispatcher", url, receiver, args.jobs, args.per_commit))
        finally:
            for proc in procs:
                stop(proc)
            receiver.stop()
    for r in rows:
        print(
            f"  {r['phase']:<13} {r['events']} events ({r['distinct']} distinct, verified={r['verified']}): "
            f"{r['per_s']:.0f} deliveries/s; latency p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
            f"max {r['max_ms']:.0f} ms"
        )
    ok = all(r["events"] == r["distinct"] == args.jobs and r["verified"] for r in rows)
    print(
        "every event delivered once, every signature verified"
        if ok
        else "FAILED: duplicates or bad signatures"
    )
    return 0 if ok else 1


def _secret(url: str) -> str:
    with get_sessionmaker(url)() as s:
        return webhook_secrets.get(s, "bench").current


if __name__ == "__main__":
    raise SystemExit(main())
