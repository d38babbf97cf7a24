"""CPU-bound request work (image decoding, hashing, parsing large bodies) off the event loop.

Such work runs in a small pool of its own (``decode_threads``, 2 by default), so a request full of
decompression bombs waits for a thread instead of freezing every other request, and it never takes
the threads that sync routes and database calls use. Pillow, hashlib and zlib release the GIL while
they work, so the event loop keeps answering meanwhile (``bench/hostile.py`` measures it).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from shared.settings import Settings

T = TypeVar("T")


def cpu_pool(settings: Settings) -> ThreadPoolExecutor:
    """The app's pool (``app.state.cpu_pool``); a plain executor works from any event loop."""
    return ThreadPoolExecutor(max_workers=max(1, settings.decode_threads),
                              thread_name_prefix="stylequeue-cpu")


async def off_loop(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the app's CPU pool."""
    pool: ThreadPoolExecutor = request.app.state.cpu_pool
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))


__all__ = ["cpu_pool", "off_loop"]
