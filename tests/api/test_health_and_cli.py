"""Health checks, dependency failures, migrations, and the CLI over a real HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, update

from api.app import create_app
from api.publisher import CeleryPublisher
from shared.cli import main
from shared.db import session_scope
from shared.migrate import upgrade
from shared.models import Base, Job
from shared.settings import Settings
from tests.support.apps import Api, FakePublisher, build_api
from tests.support.images import image_bytes
from tests.support.servers import free_port


def test_healthz_and_readyz(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_with_broken_broker_and_storage(settings_factory: Callable[..., Settings]) -> None:
    port = free_port()
    settings = settings_factory(
        broker_url=f"redis://127.0.0.1:{port}/0",
        storage_url="s3://missing/p",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
    )
    api = build_api(settings, CeleryPublisher(settings))
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"]
    body = r.json()
    assert body["error"]["code"] == "not_ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("down")
    assert body["checks"]["storage"].startswith("down")


def test_readyz_broker_down_only(settings_factory: Callable[..., Settings]) -> None:
    api = build_api(settings_factory(), FakePublisher(down=True))
    r = api.client.get("/readyz")
    assert r.status_code == 503 and "broker" in r.json()["error"]["message"]


def test_database_down_is_503(api: Api, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    bad = Settings(data_dir=tmp_path, database_url=f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x")
    app = create_app(bad, publisher=FakePublisher(), migrate=False)
    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer sq_x"})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "database_unavailable"
    assert client.get("/readyz").json()["checks"]["database"].startswith("down")


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migrations_match_the_models(which: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (
        f"sqlite:///{tmp_path / 'new' / 'dir' / 'x.db'}"
        if which == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    upgrade(url)
    upgrade(url)  # safe to run at every start
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


@pytest.fixture
def live(settings_factory: Callable[..., Settings]) -> Iterator[tuple[str, Api]]:
    api = build_api(settings_factory())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", api
    server.should_exit = True
    thread.join(5)


def test_cli_keys_submit_status_and_download(
    live: tuple[str, Api],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, api = live
    assert main(["keys", "create", "--tenant", "carol"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("sq_")
    files = []
    for name in ("a", "b", "s"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(image_bytes())
        files.append(str(path))
    code = main(
        [
            "submit",
            files[0],
            files[1],
            "--style",
            files[2],
            "--param",
            "size=128",
            "--param",
            "iterations=5",
            "--url",
            url,
            "--key",
            key,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    batch_id = out.split()[1].rstrip(":")
    job_ids = [line.split()[0] for line in out.splitlines()[1:]]
    assert len(job_ids) == 2 and "a__s" in out and "b__s" in out
    assert main(["status", batch_id, "--url", url, "--key", key]) == 0
    assert "2 job(s)" in capsys.readouterr().out
    for job_id in job_ids:  # play the worker: finish both jobs
        key_name = f"jobs/{job_id}/result.png"
        api.storage.put_bytes(key_name, image_bytes())
        with session_scope(api.settings.database_url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status="succeeded", result_key=key_name, progress={"fraction": 1.0})
            )
    from api.client import StyleQueueClient
    from api.client_cli import download
    from api.client_wait import wait

    with StyleQueueClient(url, key) as client:
        names = dict(zip(job_ids, ["a__s", "b__s"], strict=True))
        jobs = wait(client, batch_id, names)
        assert download(client, jobs, names, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a__s.png", "b__s.png"]
    assert main(["status", job_ids[0], "--url", url, "--key", key]) == 0
    assert "succeeded" in capsys.readouterr().out


def test_openapi_docs(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/batches", "/v1/images", "/readyz"} <= set(schema["paths"])
    assert api.client.get("/docs").status_code == 200


def test_the_api_never_imports_torch_or_the_worker() -> None:
    import subprocess
    import sys

    code = (
        "import sys, api.app, api.client_cli, shared.server_cli; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('worker')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_webhook_secret_and_submit_with_a_webhook(
    live: tuple[str, Api], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, api = live
    common = ["--url", url, "--key", api.key]
    assert main(["webhook-secret", *common]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith("whsec_")
    assert main(["webhook-secret", "--rotate", *common]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("whsec_") and out[-1] != first and "previous secret also signs" in out[0]
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes())
    # a private target is refused with its reason, and nothing is created
    refused = ["submit", str(path), "--style", str(path), "--webhook", "https://10.0.0.1/hook", *common]
    assert main(refused) == 1
    assert "webhook_forbidden" in capsys.readouterr().err
    assert api.counts()["jobs"] == 0
