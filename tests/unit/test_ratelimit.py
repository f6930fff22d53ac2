"""The Redis limiters of the send lane, on the real Redis with a fake clock (no timing)."""

from __future__ import annotations

import secrets

import pytest
import redis

from core.config import Settings
from tests.support.processes import free_port
from webhooks.ratelimit import Limits, connect


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limits(services: Settings, redis_client: redis.Redis, clock: FakeClock) -> Limits:
    # A fresh key space per test under the run's prefix.
    return Limits(redis_client, f"{services.redis_prefix}{secrets.token_hex(4)}:", clock=clock)


def test_token_bucket_never_exceeds_its_rate(limits: Limits, clock: FakeClock) -> None:
    rate = 80.0
    bucket = limits.account_bucket(1, rate)
    admitted: list[float] = []
    # Ask every 2 ms for 5 simulated seconds: far more often than the rate allows.
    for _ in range(2500):
        if limits.take([bucket]).allowed:
            admitted.append(clock.now)
        clock.advance(0.002)
    start = admitted[0]
    # Over any window of T seconds at most burst + rate·T sends go out.
    for i, t in enumerate(admitted):
        for window in (0.1, 1.0):
            inside = sum(1 for u in admitted[i:] if u < t + window)
            assert inside <= bucket.burst + rate * window + 1e-9
    # And it is not starved: the long-run rate is the configured one.
    span = admitted[-1] - start
    assert abs((len(admitted) - bucket.burst) / span - rate) < 2


def test_a_denied_take_says_how_long_to_wait_and_takes_nothing(
    limits: Limits, clock: FakeClock
) -> None:
    account = limits.account_bucket(2, 1000.0)
    pair = limits.pair_bucket(2, "p_contact", interval=6.0, burst=2)
    assert limits.take([account, pair]).allowed
    assert limits.take([account, pair]).allowed
    denied = limits.take([account, pair])
    assert not denied.allowed and 5.9 < denied.wait <= 6.0
    # The account bucket was not charged for the refused send: another recipient goes.
    other = limits.pair_bucket(2, "p_other", interval=6.0, burst=2)
    for _ in range(2):
        assert limits.take([account, other]).allowed
    clock.advance(6.0)
    assert limits.take([account, pair]).allowed
    assert not limits.take([account, pair]).allowed


def test_pair_limit_with_burst_then_one_per_interval(limits: Limits, clock: FakeClock) -> None:
    pair = limits.pair_bucket(3, "p_x", interval=6.0, burst=10)
    sent = 0
    for _ in range(600):  # 60 simulated seconds, asking every 100 ms
        if limits.take([pair]).allowed:
            sent += 1
        clock.advance(0.1)
    assert sent <= 10 + 60 / 6.0
    assert sent >= 10 + 60 / 6.0 - 1


def test_breaker_opens_after_consecutive_failures_then_half_opens_for_one_probe(
    limits: Limits, clock: FakeClock
) -> None:
    for _ in range(2):
        assert not limits.breaker_failure(7, threshold=3, cooldown=30)
    assert limits.breaker_allow(7, cooldown=30).allowed
    assert limits.breaker_failure(7, threshold=3, cooldown=30)  # third in a row: open
    denied = limits.breaker_allow(7, cooldown=30)
    assert not denied.allowed and denied.wait == pytest.approx(30)
    assert limits.breaker_allow(8, cooldown=30).allowed  # another account is not affected
    clock.advance(30)
    assert limits.breaker_allow(7, cooldown=30).allowed  # the probe
    assert not limits.breaker_allow(7, cooldown=30).allowed  # only one at a time
    assert limits.breaker_failure(7, threshold=3, cooldown=30)  # the probe failed: open again
    assert not limits.breaker_allow(7, cooldown=30).allowed
    clock.advance(30)
    assert limits.breaker_allow(7, cooldown=30).allowed
    assert limits.breaker_success(7)  # the probe went through: closed
    assert limits.breaker_allow(7, cooldown=30).allowed
    assert limits.breaker_allow(7, cooldown=30).allowed


def test_a_success_resets_the_failure_count(limits: Limits) -> None:
    limits.breaker_failure(9, threshold=2, cooldown=30)
    assert not limits.breaker_success(9)  # was closed
    assert not limits.breaker_failure(9, threshold=2, cooldown=30)


def test_workspace_slots_cap_in_flight_sends_and_lapse(limits: Limits, clock: FakeClock) -> None:
    first, ok = limits.acquire_slot(1, cap=2, ttl=20)
    second, _ = limits.acquire_slot(1, cap=2, ttl=20)
    assert first and second and ok.allowed
    third, busy = limits.acquire_slot(1, cap=2, ttl=20)
    assert third is None and not busy.allowed
    other, _ = limits.acquire_slot(2, cap=2, ttl=20)  # another workspace is not affected
    assert other is not None
    limits.release_slot(1, first)
    again, _ = limits.acquire_slot(1, cap=2, ttl=20)
    assert again is not None
    # A slot whose worker died lapses after its ttl.
    clock.advance(21)
    assert limits.acquire_slot(1, cap=2, ttl=20)[0] is not None


def test_probe_of_a_paused_account_once_per_interval(limits: Limits) -> None:
    assert limits.claim_probe(5, interval=60)
    assert not limits.claim_probe(5, interval=60)
    assert limits.claim_probe(6, interval=60)


def test_without_redis_every_limiter_lets_sends_through_degraded() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    limits = Limits(client, "x:")
    decision = limits.take([limits.account_bucket(1, 80)])
    assert decision.allowed and decision.degraded
    assert limits.breaker_allow(1, cooldown=30).degraded
    token, slot = limits.acquire_slot(1, cap=1, ttl=5)
    assert token is None and slot.allowed and slot.degraded
    assert not limits.breaker_failure(1, threshold=1, cooldown=30)
    assert not limits.claim_probe(1, interval=60)
    limits.release_slot(1, "t")
    client.close()
