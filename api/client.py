"""A small HTTP client for the stylequeue API (used by ``stylequeue submit`` and ``status``)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class StyleQueueClient:
    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs: dict[str, Any] = {"transport": transport} if transport else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, **kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> StyleQueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", resp.text[:200]
            raise ApiError(resp.status_code, code, message)
        return resp.json()

    def upload_image(self, data: bytes, filename: str = "image") -> dict[str, Any]:
        """Upload once: if this tenant already has these bytes, nothing is sent again."""
        digest = hashlib.sha256(data).hexdigest()
        known = self.http.get(f"/v1/images/{digest}")
        if known.status_code == 200:
            return dict(known.json())
        resp = self.http.post("/v1/images", files={"file": (filename, data)})
        return dict(self._json(resp))

    def upload_path(self, path: Path) -> str:
        return str(self.upload_image(path.read_bytes(), path.name)["id"])

    def submit_batch(
        self,
        contents: list[str],
        styles: list[str],
        *,
        mode: str = "product",
        pairs: list[list[Any]] | None = None,
        params: dict[str, Any] | None = None,
        masks: list[str] | None = None,
    ) -> dict[str, Any]:
        """``masks``: mask image ids, named by index as a pair's third element."""
        body: dict[str, Any] = {"contents": contents, "styles": styles, "mode": mode, "params": params or {}}
        if pairs is not None:
            body["pairs"] = pairs
        if masks:
            body["masks"] = masks
        return dict(self._json(self.http.post("/v1/batches", json=body)))

    def submit_job(
        self,
        content_id: str,
        style_ids: list[str],
        params: dict[str, Any] | None = None,
        mask_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """``mask_ids``: none, or one content mask per style (same order)."""
        import json

        data = {"content_id": content_id, "style_id": style_ids, "params": json.dumps(params or {})}
        if mask_ids:
            data["mask_id"] = mask_ids
        return dict(self._json(self.http.post("/v1/jobs", data=data)))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}")))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/batches/{batch_id}")))

    def list_jobs(self, **filters: Any) -> list[dict[str, Any]]:
        """Every job matching the filters, following the cursor."""
        items: list[dict[str, Any]] = []
        params = {k: v for k, v in filters.items() if v is not None} | {"limit": 200}
        while True:
            page = self._json(self.http.get("/v1/jobs", params=params))
            items += page["items"]
            if not page["next_cursor"]:
                return items
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/jobs/{job_id}/cancel")))

    def download_result(self, job_id: str, dest: Path) -> Path:
        """Save a finished job's result (following a redirect to S3 without our key)."""
        resp = self.http.get(f"/v1/jobs/{job_id}/result", follow_redirects=True)
        if resp.status_code >= 400:
            self._json(resp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(resp.content)
        return dest


__all__ = ["ApiError", "StyleQueueClient"]
