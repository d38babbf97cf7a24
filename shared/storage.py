"""Object storage behind one small interface: a local folder or an S3-compatible bucket.

``open_storage(settings)`` picks the backend from ``settings.storage_url``:

* ``file:///abs/path`` — a folder; writes are atomic (temp file + ``os.replace``), keys may not
  escape the root, and ``url_for`` returns ``None`` (the API serves those bytes itself).
* ``s3://bucket/prefix`` — boto3 with SigV4, path-style addressing when
  ``settings.s3_endpoint_url`` is set (MinIO, moto...), short timeouts and a few retries;
  ``url_for`` is a presigned GET.

Keys used across the project: ``images/<sha256>``, ``jobs/<job_id>/result.a<attempt>.<ext>``,
``jobs/<job_id>/checkpoints/<step>.pt`` and ``.png``, all built by ``shared.storage_keys`` (with the
media types objects are stored and served with).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from shared.settings import Settings

logger = logging.getLogger(__name__)


class StorageError(Exception):
    """Any storage failure that is not one of the more specific ones below."""


class StorageUnavailable(StorageError):
    """Transient: endpoint unreachable, timeouts, 5xx. Retrying later may succeed."""


class ObjectNotFound(StorageError):
    """No object under that key."""


@runtime_checkable
class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def url_for(self, key: str, *, expires_s: int) -> str | None: ...
    def check(self) -> None: ...


def _clean_key(key: str) -> str:
    """Reject keys that are empty, absolute or climb out of the root ("..")."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class FolderStorage:
    """A local folder. Safe for several processes on one machine (atomic renames)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / _clean_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"storage key {key!r} escapes the storage root")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url_for(self, key: str, *, expires_s: int) -> str | None:
        return None

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"storage folder {self.root} is not usable: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"storage folder {self.root} is not writable")

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (for tests and maintenance; not part of ``Storage``)."""
        if not self.root.exists():
            return
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not path.name.startswith(".tmp-") and key.startswith(prefix):
                yield key


class S3Storage:
    """An S3-compatible bucket, every key under ``prefix``."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            config=config,
        )

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if err.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectNotFound(key) from exc
            if status >= 500 or err.get("Code") in ("SlowDown", "ServiceUnavailable"):
                raise StorageUnavailable(f"S3 {op} {key}: {err.get('Code')}") from exc
            raise StorageError(f"S3 {op} {key}: {err.get('Code')} {err.get('Message')}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS...
            raise StorageUnavailable(f"S3 {op} {key}: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call("put_object", key, Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        resp = self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))
        try:
            return bytes(resp["Body"].read())
        finally:
            resp["Body"].close()

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    def url_for(self, key: str, *, expires_s: int) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        url = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return str(url)

    def check(self) -> None:
        try:
            self._call("head_bucket", "", Bucket=self.bucket)
        except ObjectNotFound as exc:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist") from exc
        except StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (for tests and maintenance; not part of ``Storage``)."""
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]


def open_storage(settings: Settings) -> Storage:
    """The storage named by ``settings.storage_url`` (``file:///abs/path`` or ``s3://bucket/prefix``)."""
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise StorageError(f"use file:///abs/path for folders, not {settings.storage_url}")
        return FolderStorage(Path(unquote(url.path)))
    if url.scheme == "s3":
        if not url.netloc:
            raise StorageError(f"S3 storage URL needs a bucket: {settings.storage_url}")
        return S3Storage(url.netloc, url.path, settings)
    raise StorageError(f"unsupported storage URL {settings.storage_url!r} (use file:// or s3://)")


__all__ = [
    "FolderStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "open_storage",
]
