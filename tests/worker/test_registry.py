"""A worker's start-up check and registration (``worker.registry``, ``worker.startup_check``).

In-process on SQLite and PostgreSQL: missing weights refuse (exit 2) and leave an ``unhealthy`` row
with the remedy; random weights register ``starting``, beat, become ``healthy`` when Celery is ready,
``stopping`` on a warm shutdown, and the row goes at the end; a pool process that cannot load the
engine turns the row unhealthy and stops the worker. Then real processes: ``stylequeue worker`` with
missing weights exits 2 with the remedy and consumes nothing; ``celery -A worker.tasks worker``
with random weights registers its concurrency as healthy slots and unregisters on SIGTERM.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from shared import workers
from shared.db import session_scope
from shared.migrate import upgrade
from shared.models import Job, StoredImage, Tenant, Worker
from shared.queue import make_celery, publish_job
from shared.settings import Settings
from tests.support import REPO
from tests.support.jobs import IMAGE
from tests.support.servers import stop_process
from tests.support.stacks import STYLEQUEUE, stack_env, stack_settings
from tests.support.waiting import wait_for
from worker import registry
from worker.engine.errors import WeightsError
from worker.startup_check import WeightsCheck, check_weights

NODE = "cpu@registry-test"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_settings(
    request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]
) -> Iterator[Callable[..., Settings]]:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    with session_scope(url) as s:
        s.execute(delete(Worker))

    def make(**overrides: object) -> Settings:
        values = {"weights": "random", "device": "cpu", "heartbeat_s": 0.1, "lease_s": 5, **overrides}
        return settings_factory(database_url=url, **values)

    yield make
    registry.on_shutdown()  # a test that failed half-way leaves no heartbeat thread behind


def row(settings: Settings) -> Worker | None:
    with session_scope(settings.database_url) as s:
        found = s.get(Worker, NODE)
        if found is not None:
            s.expunge(found)
        return found


def status_is(settings: Settings, status: str) -> Worker | None:
    found = row(settings)
    return found if found is not None and found.status == status else None


def beat_at(settings: Settings) -> datetime:
    found = row(settings)
    assert found is not None
    return found.heartbeat_at


def test_missing_weights_refuse_with_the_remedy(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "vgg19.pth"
    settings = make_settings(weights=str(missing))
    with pytest.raises(SystemExit) as refused:
        registry.start_up(settings, NODE, 2)
    assert refused.value.code == registry.EXIT_REFUSED == 2
    found = row(settings)
    assert found is not None and found.status == "unhealthy"
    assert found.detail is not None and "weights_unavailable" in found.detail and str(missing) in found.detail
    assert "stylequeue weights fetch" in found.detail and "STYLEQUEUE_WEIGHTS=" in found.detail
    assert found.weights == str(missing) and found.slots == 2
    assert "refusing to start" in capsys.readouterr().err
    assert registry._active is None  # nothing beats for a refused worker
    with session_scope(settings.database_url) as s:
        assert workers.healthy_slots(s, now=found.heartbeat_at, lease_s=settings.lease_s) == 0


def test_a_gpu_that_is_not_there_refuses_before_any_check(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    settings = make_settings(device="cuda:0")
    with pytest.raises(SystemExit):
        registry.start_up(settings, NODE, 1)
    found = row(settings)
    assert found is not None and found.status == "unhealthy"
    assert found.detail is not None and "STYLEQUEUE_DEVICE" in found.detail


def test_random_weights_register_beat_and_leave(make_settings: Callable[..., Settings]) -> None:
    import torch

    settings = make_settings()
    registration = registry.start_up(settings, NODE, 3)
    assert not torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # loaded in a subprocess
    found = row(settings)
    assert found is not None
    assert (found.status, found.slots, found.device, found.weights) == (
        "starting",
        3,
        "cpu",
        "random(seed=0)",
    )
    assert found.capabilities["device_kind"] == "cpu" and found.capabilities["random_weights"] is True
    first = found.heartbeat_at
    wait_for(lambda: beat_at(settings) > first, 10, "a heartbeat")
    registry.on_ready()
    found = wait_for(lambda: status_is(settings, "healthy"), 10, "healthy")
    with session_scope(settings.database_url) as s:
        assert workers.healthy_slots(s, now=found.heartbeat_at, lease_s=settings.lease_s) == 3
        s.execute(delete(Worker))  # pruned by mistake: the next beat registers again
    wait_for(lambda: row(settings) is not None, 10, "the row registered again")
    assert (row(settings) or Worker()).status == "healthy"
    registry.on_shutting_down()
    wait_for(lambda: status_is(settings, "stopping"), 10, "stopping")
    registry.on_shutdown()
    assert registry._active is None and row(settings) is None
    assert registration._thread is not None and not registration._thread.is_alive()


def test_a_pool_process_that_cannot_load_the_engine_stops_the_worker(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    loaded = WeightsCheck(True, "random", "random(seed=0)", kind="random")  # the start-up check passed
    monkeypatch.setattr(registry, "check_weights", lambda _spec: loaded)
    registration = registry.start_up(settings, NODE, 1)
    stopped = threading.Event()
    registration.on_unhealthy = stopped.set
    registry.engine_failed(WeightsError("weights_unavailable", "weights file '/gone.pth' does not exist"))
    assert stopped.wait(10), "the heartbeat did not see the unhealthy row"
    registry.on_ready()  # a late "ready" does not make it healthy again
    registry.on_shutdown()
    found = row(settings)  # kept, with why, for /v1/status
    assert found is not None and found.status == "unhealthy"
    assert (
        found.detail is not None
        and "/gone.pth" in found.detail
        and "stylequeue weights fetch" in found.detail
    )


def test_the_check_reports_a_file_that_is_not_weights(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    check = check_weights(str(junk))
    assert not check.ok and check.code == "weights_invalid"
    assert check.detail() is not None and str(junk) in (check.detail() or "")


# --- real processes ---


def _queued_job(settings: Settings) -> str:
    upgrade(settings.database_url)
    job = Job(tenant_id="t1", content_image_id=IMAGE, style_image_ids=[IMAGE], published_at=None)
    with session_scope(settings.database_url) as s:
        s.add(Tenant(id="t1", name="t1"))
        s.add(StoredImage(id=IMAGE, format="PNG", width=8, height=8, bytes=1, storage_key=f"images/{IMAGE}"))
        s.flush()
        s.add(job)
    publish_job(make_celery(settings), job.id)
    return job.id


def test_stylequeue_worker_without_weights_exits_2_and_consumes_nothing(tmp_path: Path) -> None:
    env = stack_env(tmp_path, weights=str(tmp_path / "missing.pth"))
    settings = stack_settings(env)
    job_id = _queued_job(settings)  # a message waits in the broker
    done = subprocess.run(
        [*STYLEQUEUE, "worker", "--cpu"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to start" in done.stderr and "stylequeue weights fetch" in done.stderr
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.attempt) == ("queued", 0)
        rows = list(s.scalars(select(Worker)))
    assert [r.status for r in rows] == ["unhealthy"] and rows[0].id.startswith("cpu@")
    assert "missing.pth" in (rows[0].detail or "")


def test_celery_worker_with_random_weights_registers_its_slots(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    settings = stack_settings(env)
    upgrade(settings.database_url)
    node = f"cpu@registry-{tmp_path.name[-8:]}"
    command = [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "-P", "prefork", "-c", "2"]
    command += [
        "-n",
        node,
        "-Q",
        settings.queue_name,
        "--loglevel",
        "info",
        "--without-gossip",
        "--without-mingle",
    ]
    log = (tmp_path / "celery.log").open("wb")
    proc = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:

        def healthy() -> Worker | None:
            with session_scope(settings.database_url) as s:
                found = s.scalars(select(Worker).where(Worker.id == f"{node}#{proc.pid}")).first()
                if found is None or found.status != "healthy":
                    assert proc.poll() is None, (tmp_path / "celery.log").read_text()[-3000:]
                    return None
                s.expunge(found)
                return found

        found = wait_for(healthy, 90, "the worker to register healthy", interval=0.2)
        assert (found.slots, found.device, found.weights) == (2, "cpu", "random(seed=0)")
        wait_for(lambda: (healthy() or found).heartbeat_at > found.heartbeat_at, 10, "a heartbeat")
    finally:
        code = stop_process(proc)
        log.close()
    assert code == 0, (tmp_path / "celery.log").read_text()[-3000:]
    with session_scope(settings.database_url) as s:
        assert s.scalars(select(Worker).where(Worker.id.startswith(node))).first() is None
