"""``stylequeue worker`` and ``dispatch`` (shared/server_cli.py, worker/supervisor.py): start-up checks
and the plan of worker processes (no worker is started)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import server_cli
from shared.settings import Settings
from tests.support.jobs import LoadJob, MakeJob
from worker import supervisor

REPO = Path(__file__).resolve().parents[2]


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(gpus=None, concurrency=1, loglevel="info", cpu=False)
    return argparse.Namespace(**{**base, **kw})


def test_visibility_timeout_must_exceed_time_limit(settings_factory: Callable[..., Settings]) -> None:
    bad = settings_factory(visibility_timeout_s=3600, task_time_limit_s=3600)
    assert "must be greater than" in (supervisor.config_problem(bad) or "")
    good = settings_factory(visibility_timeout_s=3601, task_time_limit_s=3600)
    assert supervisor.config_problem(good) is None


def test_worker_refuses_to_start_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    env.update(
        STYLEQUEUE_DATA_DIR=str(tmp_path / "d"),
        STYLEQUEUE_VISIBILITY_TIMEOUT_S="60",
        STYLEQUEUE_TASK_TIME_LIMIT_S="120",
    )
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "refusing to start" in out.stderr and "VISIBILITY_TIMEOUT_S (60)" in out.stderr
    assert not (tmp_path / "d").exists()  # nothing was created


def test_plan_one_worker_per_gpu(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory()
    workers = supervisor.plan(args(gpus="0,2"), s)
    assert [name.split("@")[0] for name, _ in workers] == ["gpu0", "gpu2"]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in workers] == ["0", "2"]
    cpu = supervisor.plan(args(cpu=True, gpus="0,1"), s)
    assert len(cpu) == 1 and cpu[0][0].startswith("cpu@") and cpu[0][1]["CUDA_VISIBLE_DEVICES"] == ""


def test_detect_gpus_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert supervisor.detect_gpus() == ["1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert supervisor.detect_gpus() == []


def test_celery_command_is_prefork_fair_with_node_name(settings_factory: Callable[..., Settings]) -> None:
    cmd = supervisor.celery_command("gpu0@h", args(concurrency=1), settings_factory(queue_name="q1"))
    joined = " ".join(cmd)
    assert "-A worker.tasks worker" in joined and "-P prefork -c 1 -O fair" in joined
    assert "-n gpu0@h" in joined and "-Q q1" in joined


def test_detect_gpus_does_not_import_torch() -> None:
    code = (
        "import sys, worker.supervisor as c; c.detect_gpus(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_dispatch_once_republishes_lost_jobs(
    settings: Settings,
    make_job: MakeJob,
    load_job: LoadJob,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``stylequeue dispatch --once`` (and its former name ``reconcile``) re-sends a lost message."""
    import shared.queue

    published: list[str] = []
    monkeypatch.setattr(shared.queue, "publish_job", lambda _app, job_id, **_: published.append(job_id))
    from datetime import timedelta

    from shared.db import session_scope
    from shared.models import Worker, utcnow

    with session_scope(settings.database_url) as session:  # one free slot
        session.add(
            Worker(id="w#1", host="h", device="cpu", weights="random", capabilities={}, status="healthy")
        )
    job_id = make_job(published_at=utcnow() - timedelta(hours=1))
    ns = argparse.Namespace(once=True, interval=None)
    assert server_cli.cmd_dispatch(ns) == 0
    assert published == [job_id] and load_job(job_id).published_at is not None
    assert "lost=1 requeued=0 failed=0 dispatched=1" in capsys.readouterr().out
