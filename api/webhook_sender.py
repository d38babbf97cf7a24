"""The webhook sender: one attempt at delivering one outbox event (``shared.webhook_outbox``).

Run by ``stylequeue webhooks`` (``api.webhook_task``, a Celery worker of its own queue, never a GPU
worker). An attempt takes the event's lease, renders the body the first time (the same JSON as
``GET /v1/jobs/{id}`` or ``GET /v1/batches/{id}`` at that moment) and freezes it, signs it per
Standard Webhooks with the tenant's secret(s), checks the target again (DNS may have changed since
the submission: ``shared.webhook_guard``), POSTs it pinned to the checked addresses with a timeout,
a cap on the answer read and no redirects (``shared.webhook_http``), then records the attempt and
schedules the next one or settles the event. The database is touched before and after the POST,
never during it, so a slow receiver holds no connection.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from api.presenters import Linker, job_out
from api.queries import batch_summary
from api.schemas import BatchOut
from api.webhook_breaker import FAILURES, Breaker, TenantShares
from api.webhook_input import allow_list
from shared import logs, webhook_outbox, webhook_secrets
from shared.models import Batch, Job, utcnow
from shared.settings import Settings
from shared.storage import Storage
from shared.webhook_guard import Resolver, ResolverBusy, WebhookForbidden, check_url, system_resolver
from shared.webhook_http import Response, post

logger = logging.getLogger(__name__)

Post = Callable[..., Response]


def policy_of(settings: Settings) -> webhook_outbox.RetryPolicy:
    return webhook_outbox.RetryPolicy(
        settings.webhook_backoff_s, settings.webhook_backoff_max_s, settings.webhook_retry_window_s
    )


def signed_headers(
    event_id: str, event: str, payload: str, secrets: list[str], now: datetime
) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` (one ``v1,`` signature per
    signing secret, space-separated, as the specification allows for rotations); the event's name
    in ``stylequeue-event`` (the body is the job or batch itself, as GET shows it)."""
    signatures = " ".join(Webhook(s).sign(event_id, now, payload) for s in secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "stylequeue-event": event,
        "content-type": "application/json",
    }


@dataclass
class Sender:
    sessions: sessionmaker[Session]
    settings: Settings
    storage: Storage
    resolve: Resolver = system_resolver
    post: Post = field(default=post)
    breaker: Breaker = field(default_factory=Breaker)  # per tenant and host (api.webhook_breaker)
    # A tenant's slow attempts in flight here: at most half the threads, so that one tenant's slow
    # receivers never hold every thread (its other events wait and come back, uncounted).
    shares: TenantShares = field(init=False)

    def __post_init__(self) -> None:
        self.shares = TenantShares(max(1, (self.settings.webhook_concurrency + 1) // 2))

    def deliver(self, event_id: str) -> str | None:
        """One attempt; returns the event's new state, ``deferred`` (its tenant's share of this
        sender is in flight), or None when there was nothing to do (it is settled, not due, or
        another attempt holds it)."""
        lease_s = self.settings.webhook_timeout_s * 2 + 10  # longer than any attempt's deadline
        with self.sessions() as s:
            claimed = webhook_outbox.claim(s, event_id, utcnow(), lease_s)
            s.commit()
        if claimed is None:
            return None
        token = self.shares.enter(claimed.tenant_id)
        if token is None:
            wait = self.settings.webhook_timeout_s / 2 * random.uniform(0.5, 1.5)
            with self.sessions() as s:  # if this fails, the lease ends and the event comes back
                webhook_outbox.defer(s, claimed, max(1.0, wait))
                s.commit()
            return "deferred"
        try:
            outcome = self._send(claimed)
        except Exception:  # noqa: BLE001 - a bug or an outage preparing the body: logged, retried, bounded
            logger.exception("webhook_prepare_failed event_id=%s", claimed.id)
            outcome = webhook_outbox.Outcome(None, 0.0, "not sent: the event could not be prepared")
        finally:
            self.shares.leave(claimed.tenant_id, token)
        with self.sessions() as s:
            state = webhook_outbox.record(s, claimed, outcome, policy_of(self.settings))
            s.commit()
        logs.event(
            logger,
            "webhook_attempt",
            job_id=claimed.job_id,
            level=logging.INFO if outcome.ok else logging.WARNING,
            event_id=claimed.id,
            webhook_event=claimed.event,
            attempt=claimed.attempt,
            status_code=outcome.status_code,
            latency_ms=round(outcome.latency_ms, 1),
            error=outcome.error,
            state=state,
        )
        return state

    def _send(self, claimed: webhook_outbox.Claimed) -> webhook_outbox.Outcome:
        """The body (rendered and frozen the first time) and the secrets, then the attempt."""
        with self.sessions() as s:
            payload = claimed.payload
            if payload is None:
                payload = self.render(s, claimed)
                webhook_outbox.freeze_payload(s, claimed.id, payload)
            secrets = webhook_secrets.get(s, claimed.tenant_id)
            s.commit()
        now = utcnow()
        return self.attempt(claimed, payload, secrets.signing(now), now)

    def attempt(
        self, claimed: webhook_outbox.Claimed, payload: str, secrets: list[str], now: datetime
    ) -> webhook_outbox.Outcome:
        # per tenant and host: one tenant's failing URL never defers another tenant's deliveries
        host = f"{claimed.tenant_id} {(urlsplit(claimed.url).hostname or '').lower()}"
        if not self.breaker.allow(host):  # before the lookup too: a dead host's DNS may hang
            return webhook_outbox.Outcome(
                None, 0.0, f"not sent: circuit open ({FAILURES} failed attempts in a row at this host)"
            )
        alive: bool | None = False  # None: no verdict on the receiver
        try:
            target = check_url(claimed.url, allow_list(self.settings.webhook_allow_hosts), self.resolve)
            answer = self.post(
                target,
                payload.encode("utf-8"),
                signed_headers(claimed.id, claimed.event, payload, secrets, now),
                timeout_s=self.settings.webhook_timeout_s,
                max_response_bytes=self.settings.webhook_max_response_bytes,
            )
        except WebhookForbidden as exc:
            return webhook_outbox.Outcome(None, 0.0, f"refused: {exc.message}")
        except ResolverBusy:
            alive = None  # this process's lookups are all taken: nothing learnt about the receiver
            return webhook_outbox.Outcome(None, 0.0, "not sent: host name lookups busy")
        else:
            alive = answer.error is None and answer.status_code is not None and answer.status_code < 500
        finally:  # every path settles the breaker (a half-open probe included)
            if alive is None:
                self.breaker.abandon(host)
            else:
                self.breaker.record(host, alive)
        error = answer.error
        if error is None and answer.status_code is not None and not 200 <= answer.status_code < 300:
            error = f"HTTP {answer.status_code}"
        return webhook_outbox.Outcome(answer.status_code, answer.latency_ms, error)

    def render(self, session: Session, claimed: webhook_outbox.Claimed) -> str:
        """The body: the job or batch as the API shows it now (a purged one: its id, ``deleted``)."""
        linker = Linker(None, self.settings, self.storage)
        if claimed.job_id is not None:
            job = session.get(Job, claimed.job_id)
            if job is not None and job.deleted_at is None:
                return job_out(job, linker).model_dump_json()
            return _gone(claimed.job_id)
        batch = session.get(Batch, claimed.batch_id) if claimed.batch_id else None
        if batch is not None and batch.deleted_at is None:
            return BatchOut(**batch_summary(session, batch)).model_dump_json()
        return _gone(claimed.batch_id or "")


def _gone(object_id: str) -> str:
    return json.dumps({"id": object_id, "deleted": True})


__all__ = ["Post", "Sender", "policy_of", "signed_headers"]
