"""Request rate limits per API key, and per client address for failed authentications.

Applied by ``api.deps.current_tenant`` (so every authenticated route is covered, and nothing else):

* **Per key**: ``STYLEQUEUE_RATE_LIMIT`` (the limits library's syntax, e.g. ``"20/second;600/minute"``;
  ``""`` = none), or the tenant's override (``stylequeue tenants set-limits --rate-limit``; ``off``
  stores ``""``). Over it: 429 ``rate_limited``.
* **Per client address, failed authentications only** (``AUTH_FAILURES``): each unknown key costs a
  database query, so once an address has failed that often, requests with a key this process has not
  authenticated before get 429 ``rate_limited`` *before* the database is asked. A key that
  authenticated here recently passes, so a flood from behind a shared NAT or proxy does not lock out
  the tenants there (behind a proxy, run uvicorn with ``--proxy-headers`` so the address is the
  client's).

Strategy: the **moving window** (``limits.MovingWindowRateLimiter``). It is exact: at no moment do
more than N requests fall in any window of the limit's length, where a fixed window lets 2N through
around a window boundary; a refused request is not recorded, so a client retrying while refused does
not push its own reset further away. It costs one timestamp per counted request (at most N per key
and limit: 600 for 600/minute), which is small at these limits.

Response headers, after **draft-ietf-httpapi-ratelimit-headers-06** (the separate fields)::

    RateLimit-Limit: 20            quota of the policy nearest exhaustion (lowest remaining)
    RateLimit-Remaining: 19        requests left in that policy's window
    RateLimit-Reset: 1             seconds until that window frees quota (moving window: the oldest
                                   counted request leaves it)
    RateLimit-Policy: 20;w=1, 600;w=60     every policy: quota;w=window in seconds

They are on every answer to an authenticated request: ``current_tenant`` leaves them in the request's
state and ``RateLimitHeadersMiddleware`` adds them to the response as it starts, whatever built it
(a model, a ``Response`` of a submission, a streamed download, an error). A 429 carries them too,
with ``Retry-After``: whole seconds >= 1 until the refusing policy frees a request.

Storage: ``STYLEQUEUE_RATE_LIMIT_STORAGE``; by default the broker's Redis when the broker is Redis
(counters shared by every API process), else ``memory://`` (per process: N processes allow N times
the limit). The storage calls are blocking network I/O: they run inside ``current_tenant``, a sync
dependency, hence in FastAPI's threadpool and never on the event loop. **Fail open**: when the storage
is unreachable (or times out after ``STORAGE_TIMEOUT_S``) requests are let through unlimited, a
warning is logged, and the storage is not tried again for ``OUTAGE_BACKOFF_S``: a Redis blip must not
take the API down.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from fastapi import Request
from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import logs
from shared.errors import TooManyRequests
from shared.quotas import parse_rate_limit
from shared.settings import Settings
from shared.tenants import hash_key

logger = logging.getLogger(__name__)
T = TypeVar("T")

AUTH_FAILURES = "10/second;100/minute"  # failed authentications per client address
KEY_PREFIX = "stylequeue-ratelimit"  # of every key in a Redis storage
STORAGE_TIMEOUT_S = 0.5  # a Redis call slower than this counts as an outage
OUTAGE_BACKOFF_S = 5.0  # after a storage failure, requests go unlimited this long before a new try
KNOWN_KEYS = 4096  # recently authenticated keys (hashes) that skip the per-address gate
_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://")
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Window:
    """Where a caller stands against its policies, as RateLimit header fields."""

    limit: int
    remaining: int
    reset_s: int
    policy: str

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": self.policy,
        }


@lru_cache(maxsize=256)
def _items(text: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_rate_limit(text))


def storage_uri(settings: Settings) -> str:
    """The limits storage: the setting, else the broker's Redis, else in-process memory."""
    if settings.rate_limit_storage:
        return settings.rate_limit_storage
    return settings.broker_url if settings.broker_url.startswith(_REDIS_SCHEMES) else "memory://"


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unix-socket"


class RateLimiter:
    """The limits of one API app (``limiter_for``); thread-safe."""

    def __init__(
        self, uri: str, default: str, *, key_prefix: str = KEY_PREFIX, auth_failures: str = AUTH_FAILURES
    ) -> None:
        try:
            self.default = _items(default)
        except ValueError:
            raise ValueError(
                f"STYLEQUEUE_RATE_LIMIT={default!r} is not a rate limit (e.g. 20/second)"
            ) from None
        options: dict[str, Any] = {"wrap_exceptions": True}
        if uri.startswith(_REDIS_SCHEMES):
            options.update(
                key_prefix=key_prefix,
                socket_timeout=STORAGE_TIMEOUT_S,
                socket_connect_timeout=STORAGE_TIMEOUT_S,
            )
        self.scheme = uri.split(":", 1)[0]
        self.storage = storage_from_string(uri, **options)
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.auth_failures = _items(auth_failures)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._known: OrderedDict[str, None] = OrderedDict()

    # --- per key ---
    def hit_key(self, key_id: str, override: str | None) -> Window | None:
        """Count one request of this key; ``TooManyRequests`` over its limit. The window for the
        headers, or None when the key has no limit or the storage is out."""
        items = self._key_items(override)
        if not items:
            return None
        return self._guarded(lambda: self._hit(items, ("key", key_id)))

    def _key_items(self, override: str | None) -> tuple[RateLimitItem, ...]:
        if override is None:
            return self.default
        try:
            return _items(override)
        except ValueError:  # set in SQL, bypassing `tenants set-limits`' check
            logs.event(logger, "rate_limit_invalid", kind="request", level=logging.WARNING, value=override)
            return self.default

    def _hit(self, items: Sequence[RateLimitItem], ids: tuple[str, ...]) -> Window:
        for item in items:
            if not self.strategy.hit(item, *ids):
                window = self._window(items, ids)
                retry = self._reset_s(item, ids)
                raise TooManyRequests(
                    "rate_limited",
                    f"more than {item.amount} requests in {item.get_expiry()} s with this API key: "
                    f"slow down and retry in {retry} s",
                    retry_after_s=retry,
                    extra_headers=window.headers(),
                )
        return self._window(items, ids)

    # --- per client address, failed authentications ---
    def check_client(self, address: str, token: str) -> None:
        """Before the database: 429 when ``address`` failed too often and ``token`` is not a key
        this process authenticated recently."""
        if self._is_known(token):
            return
        self._guarded(lambda: self._check_failures(address))

    def _check_failures(self, address: str) -> None:
        ids = ("auth-failures", address)
        for item in self.auth_failures:
            if self.strategy.get_window_stats(item, *ids).remaining <= 0:
                retry = self._reset_s(item, ids)
                raise TooManyRequests(
                    "rate_limited",
                    f"more than {item.amount} failed authentications in {item.get_expiry()} s from your "
                    f"address: check your API key and retry in {retry} s",
                    retry_after_s=retry,
                    extra_headers=self._window(self.auth_failures, ids).headers(),
                )

    def failed(self, address: str) -> None:
        """Count a failed authentication from ``address``."""
        self._guarded(
            lambda: [self.strategy.hit(item, "auth-failures", address) for item in self.auth_failures]
        )

    def succeeded(self, token: str) -> None:
        with self._lock:
            self._known[hash_key(token)] = None
            self._known.move_to_end(hash_key(token))
            while len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    def _is_known(self, token: str) -> bool:
        with self._lock:
            return hash_key(token) in self._known

    # --- windows, and failing open ---
    def _reset_s(self, item: RateLimitItem, ids: tuple[str, ...]) -> int:
        reset = self.strategy.get_window_stats(item, *ids).reset_time
        return max(1, math.ceil(reset - time.time()))

    def _window(self, items: Sequence[RateLimitItem], ids: tuple[str, ...]) -> Window:
        """The policy nearest exhaustion (lowest remaining; ties: the later reset), and them all."""
        now = time.time()
        states = []
        for item in items:
            stats = self.strategy.get_window_stats(item, *ids)
            states.append((max(0, stats.remaining), -max(0, math.ceil(stats.reset_time - now)), item.amount))
        remaining, neg_reset, limit = min(states)
        policy = ", ".join(f"{item.amount};w={item.get_expiry()}" for item in items)
        return Window(limit, remaining, -neg_reset, policy)

    def _guarded(self, call: Callable[[], T]) -> T | None:
        """``call()``, or None (let the request through) while the storage is unreachable."""
        if time.monotonic() < self._down_until:
            return None
        try:
            return call()
        except (StorageError, OSError) as exc:
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_S
            cause = exc.storage_error if isinstance(exc, StorageError) else exc
            logs.event(
                logger,
                "rate_limit_storage_unreachable",
                kind="request",
                level=logging.WARNING,
                storage=self.scheme,
                error=type(cause).__name__,
                action=f"requests are not rate-limited for the next {OUTAGE_BACKOFF_S:g} s",
            )
            return None


STATE_KEY = "ratelimit_headers"  # in the request's state (scope["state"]): set by current_tenant


class RateLimitHeadersMiddleware:
    """Adds the RateLimit headers ``current_tenant`` left in the request's state to the response
    (pure ASGI: streamed bodies pass through untouched); a header already set (a 429) is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            window: dict[str, str] | None = scope.get("state", {}).get(STATE_KEY)
            if message["type"] == "http.response.start" and window:
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in window.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def limiter_for(app: Any, settings: Settings) -> RateLimiter:
    """The app's limiter (``app.state.rate_limiter``), built on first use."""
    limiter: RateLimiter | None = getattr(app.state, "rate_limiter", None)
    if limiter is None:
        with _BUILD_LOCK:
            limiter = getattr(app.state, "rate_limiter", None)
            if limiter is None:
                limiter = RateLimiter(storage_uri(settings), settings.rate_limit)
                app.state.rate_limiter = limiter
                logs.event(
                    logger,
                    "rate_limiter_ready",
                    kind="request",
                    storage=limiter.scheme,
                    limit=settings.rate_limit,
                )
    return limiter


__all__ = [
    "AUTH_FAILURES",
    "STATE_KEY",
    "RateLimitHeadersMiddleware",
    "RateLimiter",
    "Window",
    "client_address",
    "limiter_for",
    "storage_uri",
]
