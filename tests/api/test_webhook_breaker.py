"""api.webhook_breaker: a receiving host that keeps failing stops taking the sender's threads for a
cooldown that doubles, one probe goes through after it, a success closes it; tenants are separate."""

from __future__ import annotations

from api.webhook_breaker import COOLDOWN_S, FAILURES, Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_probes_once_and_closes_on_success() -> None:
    clock = Clock()
    b = Breaker(clock)
    for _ in range(FAILURES - 1):
        assert b.allow("t h")
        b.record("t h", False)
    assert b.allow("t h")
    b.record("t h", False)  # the FAILURES-th in a row: open
    assert not b.allow("t h")
    assert b.allow("t other")  # another tenant or host is unaffected
    clock.now += COOLDOWN_S + 0.1
    assert b.allow("t h")  # half open: one probe...
    assert not b.allow("t h")  # ...and only one
    b.record("t h", False)  # the probe failed: open again, for twice as long
    clock.now += COOLDOWN_S + 0.1
    assert not b.allow("t h")
    clock.now += COOLDOWN_S
    assert b.allow("t h")
    b.record("t h", True)  # the receiver is back
    assert all(b.allow("t h") for _ in range(3))


def test_a_success_between_failures_resets_the_count() -> None:
    b = Breaker(Clock())
    for _ in range(3):
        for _ in range(FAILURES - 1):
            b.record("t h", False)
        b.record("t h", True)
    assert b.allow("t h")


def test_only_slow_attempts_count_against_a_tenants_share() -> None:
    from api.webhook_breaker import TenantShares

    clock = Clock()
    shares = TenantShares(cap=2, slow_s=1.0, clock=clock)
    fast = [shares.enter("t") for _ in range(10)]  # all just started: none is slow yet
    assert all(t is not None for t in fast)
    for token in fast[2:]:
        assert token is not None
        shares.leave("t", token)
    clock.now += 1.5  # the two left in flight are now slow: t's share is full
    assert shares.enter("t") is None
    assert shares.enter("other") is not None  # another tenant is not held up
    assert fast[0] is not None
    shares.leave("t", fast[0])
    assert shares.enter("t") is not None
