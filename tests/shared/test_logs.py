"""One log-line shape for every event, and the opt-in JSON format."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from shared import logs


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    logs.configure(logging.INFO, fmt)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    return logging.getLogger("stylequeue.test"), stream


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_shape() -> None:
    log, out = _capture("text")
    logs.event(log, "claimed", job_id="j1", attempt=2, worker="w@h")
    logs.event(
        log, "db_unavailable", kind="request", level=logging.ERROR, path="/v1/jobs", error=OSError("down")
    )
    first, second = out.getvalue().splitlines()
    assert first.endswith("job_event job_id=j1 attempt=2 event=claimed worker=w@h")
    assert second.endswith(
        "request_event job_id=- attempt=- event=db_unavailable path=/v1/jobs error=OSError('down')"
    )
    assert " ERROR " in second


def test_json_format_carries_the_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    log, out = _capture(None)  # type: ignore[arg-type]
    logs.event(log, "succeeded", job_id="j1", attempt=1, result_key="jobs/j1/result.a1.png")
    try:
        raise ValueError("boom")
    except ValueError:
        logs.event(
            log, "crash", job_id="j1", attempt=1, level=logging.ERROR, exc_info=True, code="internal_error"
        )
    a, b = (json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{"))
    assert (a["event"], a["job_id"], a["attempt"], a["result_key"], a["level"]) == (
        "succeeded",
        "j1",
        1,
        "jobs/j1/result.a1.png",
        "INFO",
    )
    assert a["message"] == "job_event job_id=j1 attempt=1 event=succeeded result_key=jobs/j1/result.a1.png"
    assert b["code"] == "internal_error" and "ValueError: boom" in b["exception"]


def test_no_module_formats_its_own_event_lines() -> None:
    """Every event line goes through shared.logs.event (the one shape)."""
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(p.relative_to(root))
        for pkg in ("api", "shared", "worker")
        for p in (root / pkg).rglob("*.py")
        if "_event job_id=" in p.read_text() and p.name != "logs.py"
    ]
    assert offenders == []
