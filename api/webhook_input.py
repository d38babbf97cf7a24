"""A submission's ``webhook`` and ``webhook_events_filter``: checked before anything is created.

The target is checked as ``shared.webhook_guard`` checks it at every delivery (https, no private or
metadata address, for every address its name resolves to); a refusal is a 422 ``webhook_forbidden``
and the submission creates nothing. Resolving a name blocks: this runs off the event loop, with the
rest of the submission's validation, and the resolver is bounded by a timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from shared.webhook_guard import (
    MAX_URL_LENGTH,
    AllowList,
    Resolver,
    WebhookForbidden,
    check_url,
    system_resolver,
)

from api.safejson import loads
from shared import webhooks
from shared.errors import InvalidInput
from shared.settings import Settings


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


def checked(
    url: str | None,
    events: Sequence[str] | None,
    settings: Settings,
    *,
    batch: bool,
    resolve: Resolver = system_resolver,
) -> WebhookRequest | None:
    """The webhook of a submission, or None without one; raises InvalidInput (422)."""
    if url is None or not url.strip():
        if events is not None:
            raise InvalidInput("invalid_webhook_events", "webhook_events_filter needs a webhook URL")
        return None
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput("webhook_forbidden", f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    chosen = events_filter(events, batch=batch)
    try:
        target = check_url(url, allow_list(settings.webhook_allow_hosts), resolve)
    except WebhookForbidden as exc:
        raise InvalidInput("webhook_forbidden", exc.message) from None
    return WebhookRequest(target.url, chosen)


__all__ = ["WebhookRequest", "allow_list", "checked", "events_filter", "parse_events_field"]
