"""A submission's ``webhook`` and ``webhook_events_filter``: checked before anything is created.

The target is checked as ``shared.webhook_guard`` checks it at every delivery (https, no private or
metadata address, for every address its name resolves to); a refusal is a 422 ``webhook_forbidden``
and the submission creates nothing. Two steps: ``parsed`` (no DNS) runs with the submission's other
validation; ``resolved`` looks the host up in a small pool of its own (never the image-decoding pool:
a tenant's slow name server must not stall other tenants' submissions), at most
``LOOKUPS_PER_TENANT`` at once per tenant (more: 429), each bounded by the guard's timeout; when the
guard's lookups are all taken, a 503 to retry (not a verdict on the target).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from api.safejson import loads
from shared import webhooks
from shared.errors import InvalidInput, ServiceUnavailable, TooManyRequests
from shared.settings import Settings
from shared.webhook_guard import (
    MAX_URL_LENGTH,
    AllowList,
    Resolver,
    ResolverBusy,
    WebhookForbidden,
    check_syntax,
    check_url,
    system_resolver,
)


@dataclass(frozen=True)
class WebhookRequest:
    url: str
    events: tuple[str, ...]


@lru_cache(maxsize=8)
def allow_list(setting: str) -> AllowList:
    return AllowList.parse(setting)


def parse_events_field(raw: str | None) -> list[str] | None:
    """The form field: a JSON list (``["start","completed"]``) or comma-separated names."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("["):
        value = loads(text, what="webhook_events_filter", max_bytes=1024)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(
                "invalid_webhook_events", "webhook_events_filter must be a list of event names"
            )
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def events_filter(raw: Sequence[str] | None, *, batch: bool) -> tuple[str, ...]:
    allowed = webhooks.BATCH_EVENTS if batch else webhooks.JOB_EVENTS
    if raw is None:
        return webhooks.DEFAULT_BATCH_EVENTS if batch else webhooks.DEFAULT_JOB_EVENTS
    if len(raw) > len(allowed) * 2 or not raw:
        raise InvalidInput(
            "invalid_webhook_events", f"webhook_events_filter: one or more of {', '.join(allowed)}"
        )
    unknown = sorted({e for e in raw if e not in allowed})
    if unknown:
        raise InvalidInput(
            "invalid_webhook_events",
            f"unknown webhook event {unknown[0][:40]!r}; allowed here: {', '.join(allowed)}",
        )
    return tuple(e for e in allowed if e in raw)  # a fixed order, no repeats


def parsed(
    url: str | None, events: Sequence[str] | None, settings: Settings, *, batch: bool
) -> WebhookRequest | None:
    """The webhook of a submission, checked without DNS (``resolved`` does the rest), or None
    without one; raises InvalidInput (422)."""
    if url is None or not url.strip():
        if events is not None:
            raise InvalidInput("invalid_webhook_events", "webhook_events_filter needs a webhook URL")
        return None
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput("webhook_forbidden", f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    chosen = events_filter(events, batch=batch)
    try:
        check_syntax(url, allow_list(settings.webhook_allow_hosts))
    except WebhookForbidden as exc:
        raise InvalidInput("webhook_forbidden", exc.message) from None
    return WebhookRequest(url, chosen)


async def resolved(
    hook: WebhookRequest, settings: Settings, tenant_id: str, resolve: Resolver | None = None
) -> WebhookRequest:
    """``hook`` with its normalised URL once every address its host resolves to is allowed."""
    resolve = resolve or RESOLVER
    with _lookup_slot(tenant_id):
        loop = asyncio.get_running_loop()
        allow = allow_list(settings.webhook_allow_hosts)
        try:
            target = await loop.run_in_executor(_POOL, check_url, hook.url, allow, resolve)
        except WebhookForbidden as exc:
            raise InvalidInput("webhook_forbidden", exc.message) from None
        except ResolverBusy:
            raise ServiceUnavailable(
                "webhook_lookups_busy", "too many webhook host lookups are pending; try again shortly"
            ) from None
    return WebhookRequest(target.url, hook.events)


RESOLVER: Resolver = system_resolver  # tests put a slow one here
LOOKUP_THREADS = 8  # the API's webhook lookups at once (each at most the guard's RESOLVE_TIMEOUT_S)
LOOKUPS_PER_TENANT = 2
_POOL = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="webhook-lookup")
_lookups: dict[str, int] = {}
_lookups_lock = threading.Lock()


@contextmanager
def _lookup_slot(tenant_id: str) -> Iterator[None]:
    with _lookups_lock:
        if _lookups.get(tenant_id, 0) >= LOOKUPS_PER_TENANT:
            raise TooManyRequests(
                "webhook_lookups_busy",
                f"at most {LOOKUPS_PER_TENANT} webhook host lookups at once per tenant",
                retry_after_s=2,
            )
        _lookups[tenant_id] = _lookups.get(tenant_id, 0) + 1
    try:
        yield
    finally:
        with _lookups_lock:
            left = _lookups.get(tenant_id, 1) - 1
            if left > 0:
                _lookups[tenant_id] = left
            else:
                _lookups.pop(tenant_id, None)


__all__ = [
    "LOOKUPS_PER_TENANT",
    "WebhookRequest",
    "allow_list",
    "events_filter",
    "parse_events_field",
    "parsed",
    "resolved",
]
