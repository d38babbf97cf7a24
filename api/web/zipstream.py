"""A zip archive written as it is sent: ``zipfile`` writing to a sink that hands its bytes on in chunks,
so the memory held is one stored object (read through ``shared.storage``) and one chunk, whatever the
number of results. Results are already compressed images: entries are STORED (no deflate)."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from shared import logs
from shared.storage import ObjectNotFound, Storage, StorageError

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024


class _Sink:
    """A write-only, unseekable file: zipfile then writes data descriptors and never seeks back."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


@dataclass(frozen=True)
class Entry:
    name: str  # the name in the archive
    read: Callable[[], bytes]  # the bytes, read when the entry is written
    modified: datetime


def zip_chunks(entries: Iterable[Entry], notes: Callable[[list[str]], str] | None = None) -> Iterator[bytes]:
    """The archive's bytes, chunk by chunk. An entry whose object is missing is left out and named in
    ``README.txt`` (``notes``: its text, from the list of what was left out)."""
    sink = _Sink()
    skipped: list[str] = []
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
        for entry in entries:
            try:
                data = entry.read()
            except ObjectNotFound:
                skipped.append(entry.name)
                continue
            info = zipfile.ZipInfo(entry.name, entry.modified.timetuple()[:6])
            info.file_size = len(data)
            with archive.open(info, "w") as out:
                for start in range(0, len(data), CHUNK):
                    out.write(data[start : start + CHUNK])
                    yield sink.take()
            del data
            yield sink.take()
        if notes is not None:
            archive.writestr("README.txt", notes(skipped))
    yield sink.take()


def reader(storage: Storage, key: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return storage.get_bytes(key)
        except ObjectNotFound:
            raise
        except StorageError as exc:  # mid-stream: the download ends short; the client sees it fail
            logs.event(
                logger, "zip_read_failed", kind="request", level=logging.WARNING, error=type(exc).__name__
            )
            raise

    return read


__all__ = ["CHUNK", "Entry", "reader", "zip_chunks"]
