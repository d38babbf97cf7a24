"""The client commands as a terminal shows them: ``submit --wait`` (one clean bar per job, no log
lines, no presigned URLs), an API that is down (one line naming its URL), an unknown id."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import func, select, update

from api.client_wait import job_state
from shared.cli import main
from shared.db import session_scope
from shared.models import Job
from tests.support import REPO
from tests.support.apps import Api
from tests.support.images import image_bytes
from tests.support.servers import S3Endpoint, free_port, stop_process
from tests.support.waiting import wait_for

Serve = Callable[..., tuple[str, Api]]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR)")


class Output:
    """A stream read in a thread as it is written (tqdm writes ``\\r`` without newlines)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def _images(tmp_path: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        path.write_bytes(image_bytes())
        paths.append(str(path))
    return paths


def _jobs(api: Api) -> list[str]:
    with session_scope(api.settings.database_url) as session:
        return list(session.scalars(select(Job.id)))


def _set_all(api: Api, **values: object) -> None:
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).values(**values))


def _said(err: str) -> str:
    """What a command printed on stderr, without what the in-process server logged."""
    return "".join(line for line in err.splitlines(keepends=True) if line.startswith("stylequeue:"))


def _bars(stderr: str) -> list[str]:
    """The bar lines a terminal is sent: split at carriage returns and newlines, cursor moves
    removed."""
    return [s.strip() for s in re.split(r"[\r\n]+", stderr.replace("\x1b[A", "")) if s.strip()]


def test_submit_wait_shows_one_clean_bar_per_job_and_no_request_logs(
    serve_api: Serve, s3: S3Endpoint, tmp_path: Path
) -> None:
    url, api = serve_api(storage_url=s3.storage_url, s3_endpoint_url=s3.endpoint_url)  # presigned results
    a, b, s = _images(tmp_path, "a", "b", "s")
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    cmd = [sys.executable, "-m", "shared.cli", "submit", a, b, "--style", s, "--param", "size=96", "--wait"]
    proc = subprocess.Popen(
        [*cmd, "-o", str(out_dir), "--url", url, "--key", api.key],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = Output(proc.stdout), Output(proc.stderr)
    try:
        ids = wait_for(lambda: _jobs(api) if len(_jobs(api)) == 2 else None, 60, "the batch's two jobs")
        _set_all(api, status="running", attempt=1, progress={"fraction": 0.5, "eta_seconds": 12})
        wait_for(lambda: stderr.text.count("running eta 12s") >= 2, 60, "both bars running")
        for job_id in ids:  # play the worker: a result on S3, then succeeded
            api.storage.put_bytes(f"jobs/{job_id}/result.png", image_bytes(), "image/png")
        with session_scope(api.settings.database_url) as session:
            for job_id in ids:
                key = f"jobs/{job_id}/result.png"
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(status="succeeded", result_key=key, progress={"fraction": 1.0})
                )
        assert proc.wait(60) == 0, stderr.text
    finally:
        stop_process(proc)
    stdout.thread.join(10)
    stderr.thread.join(10)
    printed = stdout.text + stderr.text
    for leak in ("HTTP Request", "httpx", "X-Amz", "Signature", "http://", "Traceback"):
        assert leak not in printed, (leak, printed)
    assert not LOG_LINE.search(printed), printed
    bars = _bars(stderr.text)
    assert {bar.split()[0] for bar in bars} == {"a__s", "b__s"}, bars  # nothing but the two bars
    assert not [bar for bar in bars if "|," in bar or "| ," in bar], bars  # no stray comma
    assert [bar for bar in bars if bar.startswith("a__s")][-1].endswith("100%|██████████| succeeded")
    assert sorted(p.name for p in out_dir.iterdir()) == ["a__s.png", "b__s.png"]
    lines = stdout.text.splitlines()
    assert lines[0].startswith("batch ") and lines[0].endswith(": 2 job(s) queued"), lines
    assert len([line for line in lines if " -> " in line]) == 2


def test_job_state_text() -> None:
    running = {"status": "running", "progress": {"eta_seconds": 29.4}}
    assert job_state(running) == "running eta 29s"
    assert job_state({"status": "queued", "progress": {"eta_seconds": 3}}) == "queued"
    failed = {"status": "failed", "progress": {}, "error": {"code": "out_of_memory"}}
    assert job_state(failed) == "failed out_of_memory"


@pytest.mark.parametrize(
    "command",
    [
        ["status", "0b4c4a34-1111-4222-8333-444455556666"],
        ["webhook-secret"],
        ["webhook-secret", "--rotate"],
        ["submit", "{a}", "--style", "{a}"],
        ["submit", "{a}", "--style", "{a}", "--wait"],
    ],
)
def test_a_client_command_against_an_api_that_is_down_prints_one_line(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image,) = _images(tmp_path, "a")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = [arg.replace("{a}", image) for arg in command]
    assert main([*argv, "--url", url, "--key", "sq_x"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"stylequeue: cannot reach the API at {url} (connection refused)\n"


def test_status_of_an_unknown_id_says_no_job_or_batch(
    serve_api: Serve, s3: S3Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, api = serve_api(storage_url=s3.storage_url, s3_endpoint_url=s3.endpoint_url)
    common = ["--url", url, "--key", api.key]
    for unknown in ("0b4c4a34-1111-4222-8333-444455556666", "not-an-id"):
        assert main(["status", unknown, *common]) == 1
        assert _said(capsys.readouterr().err) == f"stylequeue: no job or batch {unknown} (for this API key)\n"
    assert main(["status", "x", "--url", url, "--key", "sq_wrong"]) == 1  # not a 404: said as it is
    assert _said(capsys.readouterr().err).startswith("stylequeue: 401 invalid_api_key: ")
    (a,) = _images(tmp_path, "a")
    assert main(["submit", a, "--style", a, *common]) == 0
    capsys.readouterr()
    (job_id,) = _jobs(api)
    api.storage.put_bytes(f"jobs/{job_id}/result.png", image_bytes(), "image/png")
    _set_all(
        api,
        status="succeeded",
        attempt=2,
        max_attempts=4,
        handbacks=1,
        result_key=f"jobs/{job_id}/result.png",
    )
    assert api.settings.max_attempts == 3
    assert main(["status", job_id, *common]) == 0
    shown = capsys.readouterr().out
    assert f"job {job_id}: succeeded 100% attempts=1 (+1 handed back)" in shown
    assert f"  result {url}/v1/jobs/{job_id}/result\n" in shown and "X-Amz" not in shown
    with session_scope(api.settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
