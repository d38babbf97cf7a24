"""CPU-bound request work (image decoding, hashing, parsing large bodies) off the event loop.

Such work runs in a small pool of its own (``decode_threads``, 2 by default), so a request full of
decompression bombs waits for a thread instead of freezing every other request, and it never takes
the threads that sync routes and database calls use. Pillow, hashlib and zlib release the GIL while
they work, so the event loop keeps answering meanwhile (``bench/hostile.py`` measures it).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Request

from shared.errors import ServiceUnavailable
from shared.settings import Settings

T = TypeVar("T")


def cpu_pool(settings: Settings) -> ThreadPoolExecutor:
    """The app's pool (``app.state.cpu_pool``); a plain executor works from any event loop."""
    return ThreadPoolExecutor(
        max_workers=max(1, settings.decode_threads), thread_name_prefix="stylequeue-cpu"
    )


class Admission:
    """How many submissions are being read and inspected at once (``app.state.admission``): each
    may hold its uploads in memory (up to ``max_form_bytes``), so past ``limit`` a new one is
    answered 503 with Retry-After instead of queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise ServiceUnavailable(
                    "busy",
                    f"{self.limit} uploads are being inspected; retry in a few seconds",
                    retry_after_s=2,
                )
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


@asynccontextmanager
async def admitted(request: Request) -> AsyncIterator[None]:
    """Hold one of the app's submission slots for the ``async with`` block (or raise 503)."""
    admission: Admission = request.app.state.admission
    admission.enter()
    try:
        yield
    finally:
        admission.leave()


async def off_loop(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the app's CPU pool."""
    pool: ThreadPoolExecutor = request.app.state.cpu_pool
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))


__all__ = ["Admission", "admitted", "cpu_pool", "off_loop"]
