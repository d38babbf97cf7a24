"""A real ``stylequeue api`` process to attack: started once, shared by tests/api/hostile and bench/fuzz.py.

``running_api(tmp, database_url, broker_url)`` migrates the (empty, throwaway) PostgreSQL database,
creates two tenants (A and B) with one API key each, starts ``python -m shared.cli api`` (uvicorn) on
a free port of 127.0.0.1 with ``STYLEQUEUE_AUTH=on``, folder storage under ``tmp`` and the given
Redis broker, waits for ``/healthz``, uploads a few images, submits one job and one batch for A, and
yields a :class:`LiveApi`. No worker runs: accepted jobs just stay queued. ``standalone_api(tmp)``
does the same on a database and Redis DB index of its own (for scripts such as bench/fuzz.py).

Everything the API logs goes to ``LiveApi.log_path``; ``log_size()`` / ``errors_since(offset)`` tie
a request to the exceptions it caused, ``log_tail()`` is meant for assertion messages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import REPO
from tests.support.images import png_bytes
from tests.support.servers import free_port, port_open, stop_process

HOST = "127.0.0.1"  # the only address the harness ever talks to
REDIS_HOST, REDIS_PORT = HOST, 6379
PG_HOST, PG_PORT = HOST, 5432
START_TIMEOUT_S = 60.0
# The tables counts() reports, by their SQL names (``images`` holds shared.models.StoredImage).
COUNTED_TABLES = ("jobs", "batches", "images", "tenant_images", "idempotency_keys")
# A tiny but valid job: one 32 px scale, one iteration (nothing runs it anyway).
TINY_PARAMS = {"size": 32, "min_size": 32, "iterations": 1}

_ERROR_RE = re.compile(r"event=unhandled_error path=(?P<path>.*?) error=(?P<error>\w+)")
_DB_DOWN_RE = re.compile(r"event=db_unavailable path=(?P<path>.*?) error=(?P<error>\w+)")


@dataclass
class LiveApi:
    """A running API and what the harness set up on it.

    * ``base_url``: ``http://127.0.0.1:<port>``;
    * ``key_a`` / ``key_b``: bearer keys of tenants A and B (``tenant_a`` / ``tenant_b``: their ids);
    * ``image_ids``: A's uploaded images (``content_id`` = ``image_ids[0]``, ``style_id`` = ``[1]``);
      ``image_b``: an image only B owns (A must never be able to use it);
    * ``job_id`` / ``batch_id``: a queued job and a 2-job batch of A's;
    * ``client(key="a")``: an ``httpx.Client`` on ``base_url`` sending A's key (``"b"``: B's, ``None``:
      no ``Authorization``, any other string: that key); no keep-alive, so a connection the API
      drops after an error never spoils the next request;
    * ``counts()``: rows in jobs, batches, images, tenant_images, idempotency_keys, plus ``objects``
      (files under the storage folder): equal before and after a request = it created nothing;
    * ``log_size()``, ``log_since(offset)``, ``errors_since(offset)`` (exception class names logged
      as unhandled, or as a database outage), ``log_tail(n)``;
    * ``healthy()``, ``ensure_alive()`` (SIGKILL and restart when ``/healthz`` does not answer:
      a frozen event loop ignores SIGTERM), ``restarts``.
    """

    tmp: Path
    env: dict[str, str]
    database_url: str
    storage_dir: Path
    log_path: Path
    port: int
    key_a: str = ""
    key_b: str = ""
    tenant_a: str = ""
    tenant_b: str = ""
    image_ids: list[str] = field(default_factory=list)
    image_b: str = ""
    job_id: str = ""
    batch_id: str = ""
    app_dir: Path = REPO  # the source tree whose ``shared.cli api`` runs
    restarts: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _pg: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def content_id(self) -> str:
        return self.image_ids[0]

    @property
    def style_id(self) -> str:
        return self.image_ids[1]

    # --- HTTP ---------------------------------------------------------------------------------

    def key_for(self, key: str | None) -> str | None:
        return {"a": self.key_a, "b": self.key_b}.get(key, key) if key is not None else None

    def client(self, key: str | None = "a", timeout: float = 10.0, **kwargs: Any) -> httpx.Client:
        headers = dict(kwargs.pop("headers", {}))
        token = self.key_for(key)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_keepalive_connections=0),
            **kwargs,
        )

    def healthy(self, timeout: float = 2.0) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    # --- evidence -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row counts of the submission tables and the number of files in the storage folder."""
        import psycopg

        query = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in COUNTED_TABLES)
        for attempt in (1, 2):
            try:
                if self._pg is None or self._pg.closed:
                    self._pg = psycopg.connect(_libpq_url(self.database_url), autocommit=True)
                row = self._pg.execute(query).fetchone()
                break
            except psycopg.OperationalError:
                self._pg = None
                if attempt == 2:
                    raise
        out = dict(zip(COUNTED_TABLES, (int(v) for v in row), strict=True))
        out["objects"] = sum(len(files) for _, _, files in os.walk(self.storage_dir))
        return out

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def errors_since(self, offset: int) -> list[str]:
        """Exception class names the API logged after ``offset``: unhandled errors (500) and
        database errors it reported as an outage (503), e.g. ``["DataError"]``."""
        text = self.log_since(offset)
        return [m["error"] for m in _ERROR_RE.finditer(text)] + [
            f"{m['error']} (as database_unavailable)" for m in _DB_DOWN_RE.finditer(text)
        ]

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return "(no API log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-n:])
        return f"--- API log (last {n} lines of {self.log_path}) ---\n{tail}"

    # --- process ------------------------------------------------------------------------------

    def start(self) -> None:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "api", "--host", HOST, "--port", str(self.port)],
            env=self.env,
            cwd=self.app_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy(timeout=1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the API did not answer /healthz in {START_TIMEOUT_S:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL the process group (a blocked event loop never handles SIGTERM)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, grace)

    def ensure_alive(self, timeout: float = 2.0) -> bool:
        """Restart the API (SIGKILL first) unless ``/healthz`` answers within ``timeout``.
        Returns True when it had to restart."""
        if self.healthy(timeout=timeout):
            return False
        self.stop(grace=0.5)
        with self.log_path.open("a") as fh:
            fh.write("\n=== harness: /healthz did not answer; API killed and restarted ===\n")
        self.start()
        self.restarts += 1
        return True

    def close(self) -> None:
        self.stop()
        if self._pg is not None:
            self._pg.close()
            self._pg = None


def _libpq_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def api_env(
    tmp: Path, database_url: str, broker_url: str, queue_name: str, **overrides: Any
) -> dict[str, str]:
    """The environment of the API process: this machine's, minus every ``STYLEQUEUE_*``, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    values: dict[str, Any] = dict(
        data_dir=tmp / "data",
        database_url=database_url,
        broker_url=broker_url,
        storage_url=f"file://{tmp / 'storage'}",
        auth="on",
        queue_name=queue_name,
        rate_limit="",  # the probes come fast from one key; a test of the limits sets one
    )
    values.update(overrides)
    env.update({f"STYLEQUEUE_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _make_tenants(api: LiveApi) -> None:
    from shared.db import session_scope
    from shared.tenants import create_key

    suffix = uuid.uuid4().hex[:6]
    with session_scope(api.database_url) as session:
        a = create_key(session, f"hostile-a-{suffix}")
        b = create_key(session, f"hostile-b-{suffix}")
    api.key_a, api.tenant_a, api.key_b, api.tenant_b = a.key, a.tenant_id, b.key, b.tenant_id


def _upload(client: httpx.Client, data: bytes) -> str:
    r = client.post("/v1/images", files={"file": ("x.png", data, "image/png")})
    assert r.status_code in (200, 201), f"upload: {r.status_code} {r.text}"
    return str(r.json()["id"])


def _seed_objects(api: LiveApi, n_images: int) -> None:
    """A's images, a job and a batch of A's; B's one image."""
    import json

    with api.client("a") as a, api.client("b") as b:
        api.image_ids = [_upload(a, png_bytes(1000 + i)) for i in range(n_images)]
        api.image_b = _upload(b, png_bytes(2000))
        r = a.post(
            "/v1/jobs",
            data={"content_id": api.content_id, "style_id": api.style_id, "params": json.dumps(TINY_PARAMS)},
        )
        assert r.status_code == 202, f"job: {r.status_code} {r.text}"
        api.job_id = r.json()["id"]
        r = a.post(
            "/v1/batches",
            json={"contents": api.image_ids[:2], "styles": [api.style_id], "params": TINY_PARAMS},
        )
        assert r.status_code == 202, f"batch: {r.status_code} {r.text}"
        api.batch_id = r.json()["id"]


def default_app_dir() -> Path:
    """This checkout, or ``$HOSTILE_APP_DIR`` (another tree, e.g. ``git archive HEAD`` unpacked,
    to attack a fixed version while this one is being edited)."""
    return Path(os.environ.get("HOSTILE_APP_DIR") or REPO).resolve()


@contextmanager
def running_api(
    tmp: Path,
    database_url: str,
    broker_url: str,
    *,
    n_images: int = 3,
    app_dir: Path | None = None,
    **settings: Any,
) -> Iterator[LiveApi]:
    """Start the API on an EMPTY database (migrated here) and set it up; stop it afterwards.
    ``settings`` become ``STYLEQUEUE_<NAME>`` variables of the API process; ``app_dir``: see
    ``default_app_dir``."""
    from shared.migrate import upgrade

    tmp.mkdir(parents=True, exist_ok=True)
    queue = f"sq-hostile-{uuid.uuid4().hex[:8]}"
    env = api_env(tmp, database_url, broker_url, queue, **settings)
    api = LiveApi(
        tmp=tmp,
        env=env,
        database_url=database_url,
        storage_dir=tmp / "storage",
        log_path=tmp / "api.log",
        port=free_port(),
        app_dir=(app_dir or default_app_dir()).resolve(),
    )
    upgrade(database_url)
    _make_tenants(api)
    try:
        api.start()
        _seed_objects(api, n_images)
        yield api
    finally:
        api.close()
        _forget_queue(broker_url, queue)


def _forget_queue(broker_url: str, queue: str) -> None:
    """Delete the messages the accepted jobs left in Redis (nothing consumes them)."""
    if not broker_url.startswith("redis://"):
        return
    try:
        import redis

        client = redis.Redis.from_url(broker_url)
        keys = list(client.scan_iter(match=f"*{queue}*"))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:  # noqa: BLE001 - cleanup only; Redis may be gone
        pass


@contextmanager
def standalone_api(tmp: Path, *, app_dir: Path | None = None, **settings: Any) -> Iterator[LiveApi]:
    """``running_api`` on a throwaway PostgreSQL database and a random Redis DB index (1-15)."""
    from tests.support.servers import temporary_database

    for host, port, what in ((PG_HOST, PG_PORT, "PostgreSQL"), (REDIS_HOST, REDIS_PORT, "Redis")):
        if not port_open(host, port):
            raise RuntimeError(f"{what} is not reachable on {host}:{port}")
    db = 1 + uuid.uuid4().int % 15
    with (
        temporary_database("sq_hostile") as url,
        running_api(tmp, url, f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", app_dir=app_dir, **settings) as api,
    ):
        yield api


__all__ = [
    "COUNTED_TABLES",
    "HOST",
    "TINY_PARAMS",
    "LiveApi",
    "api_env",
    "default_app_dir",
    "free_port",
    "png_bytes",
    "port_open",
    "running_api",
    "standalone_api",
]
