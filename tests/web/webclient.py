"""The web page in-process (``tests.support.apps.build_api``): a browser-like client that signs in with
an API key, keeps the page's cookies and reads the CSRF token from the pages, as the page's forms and
scripts do; and job rows moved to ``succeeded`` with stored files, for the pages that show results."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Job, utcnow
from shared.storage_keys import (
    RESULT_THUMB_FIELD,
    THUMB_MEDIA_TYPE,
    preview_key,
    result_key,
    result_thumb_key,
    thumb_key,
)
from shared.tenants import create_key
from tests.support.apps import Api
from tests.support.images import png_bytes

TINY = {"size": 32, "min_size": 16, "scale_factor": 2, "iterations": 3}
_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
_CSRF_BODY = re.compile(r'data-csrf="([^"]*)"')


def csrf_field(html: str) -> str:
    found = _CSRF_FIELD.search(html)
    assert found, html[:500]
    return found.group(1)


def square(seed: int) -> bytes:
    return png_bytes(seed, 48, 48)


@dataclass
class Browser:
    """One browser: its own cookies, no Authorization header."""

    api: Api
    client: TestClient

    def get(self, path: str, **kw: Any) -> httpx.Response:
        answer: httpx.Response = self.client.get(path, follow_redirects=False, **kw)
        return answer

    def post(self, path: str, **kw: Any) -> httpx.Response:
        answer: httpx.Response = self.client.post(path, follow_redirects=False, **kw)
        return answer

    def sign_in(self, key: str | None = None) -> httpx.Response:
        token = csrf_field(self.client.get("/web/login").text)
        answer = self.post("/web/login", data={"api_key": key or self.api.key, "csrf_token": token})
        assert answer.status_code == 303, answer.text
        return answer

    def csrf(self) -> str:
        found = _CSRF_BODY.search(self.client.get("/web/batches").text)
        assert found and found.group(1)
        return found.group(1)

    def submit(
        self,
        *,
        contents: int = 2,
        styles: int = 2,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        seed: int = 0,
    ) -> httpx.Response:
        """``POST /web/batches`` as the submit page's script sends it."""
        files = [("content", (f"c{i}.png", square(seed + i), "image/png")) for i in range(contents)]
        files += [("style", (f"s{i}.png", square(seed + 100 + i), "image/png")) for i in range(styles)]
        sent = {"X-CSRF-Token": self.csrf(), **(headers or {})}
        data = {"params": json.dumps(params or TINY)}
        return self.post("/web/batches", files=files, data=data, headers=sent)

    def action(self, path: str, **fields: str) -> httpx.Response:
        """A form of the page (cancel, delete, sign out), with its CSRF token."""
        return self.post(path, data={"csrf_token": self.csrf(), **fields})


def browser(api: Api, **kw: Any) -> Browser:
    return Browser(api, TestClient(api.client.app, **kw))


def new_key(api: Api, tenant: str) -> str:
    with session_scope(api.settings.database_url) as session:
        return create_key(session, tenant).key


def thumb_jpeg(seed: int) -> bytes:
    """A small JPEG, as the worker's thumbnails are (worker.thumbs)."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed, 24, 24))).convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def finish(api: Api, job_id: str, *, steps: tuple[int, ...] = (3, 6), thumbs: bool = False) -> None:
    """Move a job to ``succeeded`` with a stored result and checkpoint previews, as a worker would;
    ``thumbs``: with their thumbnails, as this version's worker (else none, as an earlier one's)."""
    storage = api.storage
    refs = []
    for seq, step in enumerate(steps):
        storage.put_bytes(preview_key(job_id, step), square(1000 + step), "image/png")
        refs.append(
            {
                "key": f"jobs/{job_id}/checkpoints/{step}.pt",
                "preview_key": preview_key(job_id, step),
                "scale": seq,
                "iteration": 3,
                "step": step,
                "seq": seq,
            }
        )
        if thumbs:
            storage.put_bytes(thumb_key(job_id, step), thumb_jpeg(3000 + step), THUMB_MEDIA_TYPE)
            refs[-1]["thumb_key"] = thumb_key(job_id, step)
    if thumbs:
        storage.put_bytes(result_thumb_key(job_id, 1), thumb_jpeg(4000 + len(job_id)), THUMB_MEDIA_TYPE)
    key = result_key(job_id, 1, "png")
    storage.put_bytes(key, square(2000 + len(job_id)), "image/png")
    progress = {"scale": 1, "scales": 2, "iteration": 3, "iterations": 3, "fraction": 1.0, "loss": 0.5}
    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="succeeded",
                result_key=key,
                checkpoints=refs,
                progress=progress,
                attempt=1,
                started_at=utcnow(),
                finished_at=utcnow(),
                execution={
                    "device": "cpu",
                    "precision": "float32",
                    "weights": "random",
                    "random_weights": True,
                    "group_size": 1,
                    "engine_seconds": 0.4,
                    **({RESULT_THUMB_FIELD: result_thumb_key(job_id, 1)} if thumbs else {}),
                },
            )
        )


__all__ = ["TINY", "Browser", "browser", "csrf_field", "finish", "new_key", "square", "thumb_jpeg"]
