"""``stylequeue health ROLE``, the containers' health checks: each says healthy only when its role
really is, and names the reason otherwise (what ``docker inspect`` and ``kubectl describe`` show)."""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared import health_cli, workers
from shared.models import Worker, utcnow
from shared.settings import Settings
from shared.workers import WorkerStatus


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_dispatcher_is_healthy_only_after_a_recent_pass(temp_dir: Path) -> None:
    settings = Settings(dispatch_interval_s=2.0)
    assert "no pass finished yet" in (health_cli.check_dispatcher(settings) or "")
    health_cli.touch_beat("dispatcher")
    assert health_cli.check_dispatcher(settings) is None
    old = time.time() - 61
    os.utime(health_cli.beat_file("dispatcher"), (old, old))
    assert "ago (limit 60s)" in (health_cli.check_dispatcher(settings) or "")


def _register(session: Session, node: str, status: WorkerStatus, detail: str | None = None) -> None:
    host = socket.gethostname()
    workers.register(
        session,
        node=f"{node}@{host}#1",
        host=host,
        device="cpu",
        weights="random(seed=0)",
        capabilities={},
        slots=1,
        status=status,
        detail=detail,
    )


def test_worker_health_is_the_workers_own_report(sqlite_url: str) -> None:
    from shared.db import get_sessionmaker
    from shared.migrate import upgrade

    upgrade(sqlite_url)
    settings = Settings(database_url=sqlite_url, lease_s=15.0)
    maker: sessionmaker[Session] = get_sessionmaker(sqlite_url)
    assert "has registered" in (health_cli.check_worker(settings) or "")
    with maker() as s:
        _register(s, "cpu", WorkerStatus.HEALTHY)
        s.commit()
    assert health_cli.check_worker(settings) is None
    with maker() as s:  # a second worker of this host that could not load its weights
        _register(s, "gpu1", WorkerStatus.UNHEALTHY, detail="weights file missing")
        s.commit()
    assert "is unhealthy: weights file missing" in (health_cli.check_worker(settings) or "")
    with maker() as s:
        s.query(Worker).filter(Worker.id.startswith("gpu1")).delete()
        row = s.query(Worker).one()
        row.heartbeat_at = utcnow() - timedelta(seconds=40)
        s.commit()
    assert "no heartbeat for 40s" in (health_cli.check_worker(settings) or "")


def test_a_failing_check_exits_1_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.servers import free_port

    monkeypatch.setenv("STYLEQUEUE_API_PORT", str(free_port()))  # nothing listens there
    from shared.settings import get_settings

    get_settings.cache_clear()
    try:
        assert health_cli.cmd_health(argparse.Namespace(role="api")) == 1
    finally:
        get_settings.cache_clear()
    assert "unhealthy: http://127.0.0.1:" in capsys.readouterr().err
