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
SLOW_S = 1.0  # an attempt in flight this long counts against its tenant's share


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
    """A tenant's SLOW attempts in flight, at most ``cap``: an attempt counts once it has run for
    ``slow_s``. Fast receivers never wait (one tenant alone may use every thread); a tenant whose
    receivers hang fills only its share, and its further events are given back for a while."""

    def __init__(self, cap: int, slow_s: float = SLOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.slow_s = slow_s
        self._clock = clock
        self._in_flight: dict[str, dict[int, float]] = {}  # tenant -> attempt token -> start
        self._next = 0
        self._lock = threading.Lock()

    def enter(self, tenant_id: str) -> int | None:
        """A token for the attempt, or None: the tenant has ``cap`` slow attempts in flight."""
        with self._lock:
            mine = self._in_flight.setdefault(tenant_id, {})
            cutoff = self._clock() - self.slow_s
            if sum(1 for started in mine.values() if started <= cutoff) >= self.cap:
                return None
            self._next += 1
            mine[self._next] = self._clock()
            return self._next

    def leave(self, tenant_id: str, token: int) -> None:
        with self._lock:
            mine = self._in_flight.get(tenant_id, {})
            mine.pop(token, None)
            if not mine:
                self._in_flight.pop(tenant_id, None)


__all__ = ["COOLDOWN_S", "FAILURES", "Breaker", "TenantShares"]
