"""The API in-process: the app on a database (SQLite or PostgreSQL) with a fake publisher and a
tenant's key, and the requests the tests make of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from shared.db import get_engine, session_scope
from shared.migrate import upgrade
from shared.models import Base, Batch, Job, StoredImage, TenantImage, Worker, utcnow
from shared.settings import Settings
from shared.tenants import create_key


@dataclass
class FakePublisher:
    """Records published job ids; ``fail`` makes it publish nothing; ``down`` breaks check()."""

    fail: bool = False
    down: bool = False
    published: list[str] = field(default_factory=list)
    on_publish: Callable[[Sequence[str]], None] | None = None

    def publish(self, job_ids: Sequence[str]) -> list[str]:
        if self.on_publish:
            self.on_publish(job_ids)
        if self.fail:
            return []
        self.published.extend(job_ids)
        return list(job_ids)

    def check(self) -> None:
        if self.down:
            raise ConnectionError("broker down")


@dataclass
class Api:
    client: TestClient
    settings: Settings
    publisher: Any
    key: str
    storage: Any

    def as_tenant(self, name: str) -> TestClient:
        with session_scope(self.settings.database_url) as session:
            key = create_key(session, name).key
        c = TestClient(self.client.app)
        c.headers["Authorization"] = f"Bearer {key}"
        return c

    def counts(self) -> dict[str, int]:
        """Rows per table and stored objects: to prove a rejected request created nothing."""
        out: dict[str, int] = {}
        with session_scope(self.settings.database_url) as session:
            for model in (Job, Batch, StoredImage, TenantImage):
                out[model.__tablename__] = session.scalar(select(func.count()).select_from(model)) or 0
        out["objects"] = len(list(self.storage.list_keys()))
        return out


def _reset(url: str) -> None:
    upgrade(url)
    with get_engine(url).begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


def register_test_worker(url: str, slots: int = 1000) -> None:
    """A healthy worker row whose heartbeat never ages: the dispatcher sees ``slots`` free slots, so
    a submission is published at once (as on an idle system). Tests of dispatch itself leave it out."""
    with session_scope(url) as session:
        session.merge(
            Worker(
                id="test-worker@test",
                host="test",
                device="cpu",
                weights="random",
                capabilities={},
                slots=slots,
                status="healthy",
                heartbeat_at=utcnow() + timedelta(days=365),
            )
        )


def build_api(settings: Settings, publisher: Any = None, *, worker_slots: int = 1000) -> Api:
    publisher = publisher if publisher is not None else FakePublisher()
    if not settings.database_url.startswith("sqlite"):
        _reset(settings.database_url)
    app = create_app(settings, publisher=publisher)
    if worker_slots:
        register_test_worker(settings.database_url, worker_slots)
    client = TestClient(app)
    with session_scope(settings.database_url) as session:
        key = create_key(session, "alice").key
    client.headers["Authorization"] = f"Bearer {key}"
    return Api(client, settings, publisher, key, app.state.storage)


def submit(
    client: TestClient,
    *,
    content: bytes | None = None,
    styles: Sequence[bytes] = (),
    params: Any = None,
    data: dict[str, Any] | None = None,
) -> Any:
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    if content is not None:
        files.append(("content", ("content.png", content, "image/png")))
    files += [("style", (f"style{i}.png", s, "image/png")) for i, s in enumerate(styles)]
    form: dict[str, Any] = dict(data or {})
    if params is not None:
        form["params"] = params if isinstance(params, str) else __import__("json").dumps(params)
    return client.post("/v1/jobs", files=files or None, data=form or None)


def upload(client: TestClient, data: bytes) -> Any:
    return client.post("/v1/images", files={"file": ("x.png", data, "image/png")})
