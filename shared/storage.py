"""Object storage behind one small interface: a local folder or an S3-compatible bucket.

``open_storage(settings)`` picks the backend from ``settings.storage_url``:

* ``file:///abs/path`` — a folder; writes are atomic (temp file + ``os.replace``), keys may not
  escape the root, and ``url_for`` returns ``None`` (the API serves those bytes itself).
* ``s3://bucket/prefix`` — ``shared.storage_s3``: boto3 with SigV4, path-style addressing when
  ``settings.s3_endpoint_url`` is set (MinIO, moto...), short timeouts and a few retries;
  ``url_for`` is a presigned GET.

This module holds the interface (``Storage``, ``Listing``), the errors, the key checks both backends
apply, the folder backend and ``open_storage``.

Keys used across the project: ``images/<sha256>``, ``jobs/<job_id>/result.a<attempt>.<ext>``,
``jobs/<job_id>/checkpoints/<step>.pt`` and ``.png``, the ``.thumb.jpg`` thumbnails of results and
previews, all built by ``shared.storage_keys`` (with the media types objects are stored and served with).

Both backends also have the maintenance side ``Listing`` (``list_objects`` with each object's
modification time, ``delete_many``), which retention (``shared.retention``, ``shared.purge``) and the
orphan sweep (``shared.orphans``) use; it is not part of ``Storage``, which is all the API and the
workers need.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from shared.settings import Settings

logger = logging.getLogger(__name__)


class StorageError(Exception):
    """Any storage failure that is not one of the more specific ones below."""


class StorageUnavailable(StorageError):
    """Transient: endpoint unreachable, timeouts, 5xx. Retrying later may succeed."""


class ObjectNotFound(StorageError):
    """No object under that key."""


@dataclass(frozen=True)
class StoredObject:
    """One object of a listing: its key and when it was last written (UTC)."""

    key: str
    modified: datetime


@runtime_checkable
class Listing(Protocol):
    """Listing and bulk deletion, for retention and the orphan sweep (both backends have them)."""

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]: ...
    def delete_many(self, keys: Sequence[str]) -> int: ...


@runtime_checkable
class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def url_for(self, key: str, *, expires_s: int) -> str | None: ...
    def check(self) -> None: ...


def clean_key(key: str) -> str:
    """Reject keys that are empty, absolute or climb out of the root ("..")."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key


def clean_prefix(prefix: str) -> str:
    """A listing prefix: "" (everything), or a key's beginning ("jobs/", "jobs/<id>/result")."""
    if prefix and (prefix.startswith("/") or "\\" in prefix or "\x00" in prefix):
        raise StorageError(f"invalid storage prefix {prefix!r}")
    if any(p in ("..", ".", "") for p in prefix.split("/")[:-1]):
        raise StorageError(f"invalid storage prefix {prefix!r}")
    return prefix


class FolderStorage:
    """A local folder. Safe for several processes on one machine (atomic renames)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / clean_key(key)).resolve()
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
        return (obj.key for obj in self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in key order (temp files left out)."""
        prefix = clean_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0]  # the deepest folder the prefix names
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.name.startswith(".tmp-") or not key.startswith(prefix):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted since the walk saw it
                continue
            if path.is_file():
                yield StoredObject(key, datetime.fromtimestamp(stat.st_mtime, timezone.utc))

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete every key (missing ones too); returns how many were asked for. Folders stay: a
        writer may be about to create a file in one."""
        for key in keys:
            self.delete(key)
        return len(keys)


def open_storage(settings: Settings) -> Storage:
    """The storage named by ``settings.storage_url`` (``file:///abs/path`` or ``s3://bucket/prefix``)."""
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise StorageError(f"use file:///abs/path for folders, not {settings.storage_url}")
        return FolderStorage(Path(unquote(url.path)))
    if url.scheme == "s3":
        from shared.storage_s3 import S3Storage  # here: shared.storage_s3 builds on this module

        if not url.netloc:
            raise StorageError(f"S3 storage URL needs a bucket: {settings.storage_url}")
        return S3Storage(url.netloc, url.path, settings)
    raise StorageError(f"unsupported storage URL {settings.storage_url!r} (use file:// or s3://)")


__all__ = [
    "FolderStorage",
    "Listing",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StoredObject",
    "open_storage",
]
