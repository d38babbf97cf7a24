"""Two protections of a sender process's threads from one tenant's receivers: a circuit breaker per
tenant and receiving host (``Breaker``), and a cap on each tenant's attempts in flight
(``TenantShares``).

Every attempt at a black-hole receiver waits out the whole timeout; a thousand events for one would
keep a sender's threads busy for hours and every other tenant's webhooks waiting. After
``FAILURES`` failed attempts in a row at one host (no answer, or a 5xx), the host's circuit opens
for a cooldown that doubles with each further opening (``COOLDOWN_S`` up to ``COOLDOWN_MAX_S``):
its events' attempts are recorded as not sent ("circuit open") and rescheduled with the usual
backoff, at no cost. After the cooldown one attempt goes through (half open): a success closes the
circuit, a failure opens it again for longer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

FAILURES = 5
COOLDOWN_S = 30.0
COOLDOWN_MAX_S = 600.0
MAX_HOSTS = 10_000  # hosts tracked; beyond this the oldest healthy ones are forgotten


@dataclass
class _Host:
    failures: int = 0
    openings: int = 0
    open_until: float = 0.0
    probing: bool = False


class Breaker:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def allow(self, host: str) -> bool:
        """Whether an attempt at ``host`` may go now (a half-open circuit lets one through)."""
        with self._lock:
            state = self._hosts.get(host)
            if state is None or state.failures < FAILURES:
                return True
            if self._clock() < state.open_until or state.probing:
                return False
            state.probing = True
            return True

    def record(self, host: str, ok: bool) -> None:
        """An attempt's outcome: a 2xx-4xx answer counts as alive (the receiver is up; a 4xx is its
        answer to this event), no answer or a 5xx as a failure."""
        with self._lock:
            state = self._hosts.get(host)
            if ok:
                if state is not None:
                    del self._hosts[host]
                return
            if state is None:
                if len(self._hosts) >= MAX_HOSTS:
                    self._forget_one()
                state = self._hosts[host] = _Host()
            state.failures += 1
            state.probing = False
            if state.failures >= FAILURES:
                state.openings += 1
                cooldown = min(COOLDOWN_MAX_S, COOLDOWN_S * 2 ** (state.openings - 1))
                state.open_until = self._clock() + cooldown

    def abandon(self, host: str) -> None:
        """An attempt that learnt nothing (it was not sent): a half-open probe may go again."""
        with self._lock:
            state = self._hosts.get(host)
            if state is not None:
                state.probing = False

    def _forget_one(self) -> None:
        closed = next((h for h, s in self._hosts.items() if s.failures < FAILURES), None)
        self._hosts.pop(closed if closed is not None else next(iter(self._hosts)))


class TenantShares:
    """Attempts in flight per tenant, at most ``cap`` each (a slow receiver holds threads too)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, tenant_id: str) -> bool:
        with self._lock:
            if self._in_flight.get(tenant_id, 0) >= self.cap:
                return False
            self._in_flight[tenant_id] = self._in_flight.get(tenant_id, 0) + 1
            return True

    def leave(self, tenant_id: str) -> None:
        with self._lock:
            left = self._in_flight.get(tenant_id, 1) - 1
            if left > 0:
                self._in_flight[tenant_id] = left
            else:
                self._in_flight.pop(tenant_id, None)


__all__ = ["COOLDOWN_S", "FAILURES", "Breaker", "TenantShares"]
