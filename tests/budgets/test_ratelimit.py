from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from budgets import RateLimiter, RateLimits, RateState, StoreUnavailable
from tests.services import REDIS_URL, redis_prefix
from tests.tcpproxy import proxy_for


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """Every behaviour below holds on both storages."""
    if request.param == "memory":
        instance = RateLimiter()
        yield instance
        await instance.close()
        return
    with redis_prefix() as prefix:
        instance = RateLimiter(REDIS_URL, key_prefix=f"LIMITS:{prefix}")
        yield instance
        await instance.close()


@pytest.fixture
async def memory_limiter() -> AsyncIterator[RateLimiter]:
    instance = RateLimiter()
    yield instance
    await instance.close()


class FakeClock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_800_000_000.0
        monkeypatch.setattr(time, "time", lambda: self.now)


async def test_request_limit_rejects_with_headers_and_retry_after(
    memory_limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = memory_limiter  # a fake clock: the Redis server keeps real time
    clock = FakeClock(monkeypatch)
    limits = RateLimits(requests_per_minute=3)
    states = [await limiter.hit("k", limits, 0) for _ in range(3)]
    assert [s.allowed for s in states] == [True, True, True]
    assert [s.remaining_requests for s in states] == [2, 1, 0]
    assert states[0].headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "60s",
    }
    clock.now += 12.5
    blocked = await limiter.hit("k", limits, 0)
    assert not blocked.allowed
    assert blocked.retry_after_s == 48  # ceil(47.5): when the blocking window resets
    assert blocked.headers()["x-ratelimit-remaining-requests"] == "0"
    assert blocked.headers()["x-ratelimit-reset-requests"] == "48s"
    clock.now += 48
    assert (await limiter.hit("k", limits, 0)).allowed  # a fresh window


async def test_token_limit_consumes_nothing_when_it_rejects(
    limiter: RateLimiter,
) -> None:
    limits = RateLimits(requests_per_minute=10, tokens_per_minute=100)
    first = await limiter.hit("k", limits, 60)
    assert (first.allowed, first.remaining_tokens, first.remaining_requests) == (
        True,
        40,
        9,
    )
    refused = await limiter.hit("k", limits, 50)
    assert not refused.allowed
    assert (refused.remaining_tokens, refused.remaining_requests) == (40, 9)
    assert refused.retry_after_s is not None and 1 <= refused.retry_after_s <= 60
    last = await limiter.hit("k", limits, 40)
    assert (last.allowed, last.remaining_tokens, last.remaining_requests) == (
        True,
        0,
        8,
    )
    headers = last.headers()
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"].endswith("s")


async def test_request_limit_rejection_consumes_no_tokens(limiter: RateLimiter) -> None:
    limits = RateLimits(requests_per_minute=1, tokens_per_minute=100)
    assert (await limiter.hit("k", limits, 10)).allowed
    refused = await limiter.hit("k", limits, 10)
    assert not refused.allowed and refused.remaining_tokens == 90
    more = await limiter.hit("k", RateLimits(tokens_per_minute=100), 90)
    assert more.allowed and more.remaining_tokens == 0


async def test_a_request_larger_than_the_whole_limit_is_refused(
    limiter: RateLimiter,
) -> None:
    state = await limiter.hit("k", RateLimits(tokens_per_minute=100), 101)
    assert not state.allowed
    assert state.remaining_tokens == 100
    assert state.retry_after_s is not None and state.retry_after_s >= 1


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    limits = RateLimits(requests_per_minute=1, tokens_per_minute=10)
    assert (await limiter.hit("tenant-a", limits, 10)).allowed
    assert not (await limiter.hit("tenant-a", limits, 1)).allowed
    assert (await limiter.hit("tenant-b", limits, 10)).allowed


async def test_request_and_token_counters_do_not_collide(limiter: RateLimiter) -> None:
    same = RateLimits(requests_per_minute=5, tokens_per_minute=5)
    state = await limiter.hit("k", same, 4)
    assert (state.remaining_requests, state.remaining_tokens) == (4, 1)


async def test_no_limits_always_allows_and_sends_no_headers(
    limiter: RateLimiter,
) -> None:
    state = await limiter.hit("k", RateLimits(), 10**9)
    assert state == RateState(True, None, None, None, None, None, None, None)
    assert state.headers() == {}


async def test_headers_only_for_configured_limits(limiter: RateLimiter) -> None:
    state = await limiter.hit("k", RateLimits(tokens_per_minute=1000), 10)
    assert set(state.headers()) == {
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
    assert state.retry_after_s is None


async def test_adjust_tokens_charges_and_refunds(limiter: RateLimiter) -> None:
    limits = RateLimits(tokens_per_minute=100)
    await limiter.hit("k", limits, 50)
    await limiter.adjust_tokens("k", limits, 30)  # used more than estimated
    assert (await limiter.hit("k", limits, 0)).remaining_tokens == 20
    await limiter.adjust_tokens(
        "k", limits, -40, window_end=time.time() + 60
    )  # used less: refunded to the window it was counted in
    assert (await limiter.hit("k", limits, 0)).remaining_tokens == 60
    await limiter.adjust_tokens(
        "k", limits, 500
    )  # already spent: may go past the limit
    refused = await limiter.hit("k", limits, 1)
    assert not refused.allowed and refused.remaining_tokens == 0
    await limiter.adjust_tokens(
        "k", RateLimits(requests_per_minute=5), 10
    )  # no token limit


async def test_limit_items_are_parsed_once_per_value(limiter: RateLimiter) -> None:
    for _ in range(5):
        await limiter.hit("a", RateLimits(10, 1000), 1)
        await limiter.hit("b", RateLimits(10, 2000), 1)
    assert len(limiter._items) == 3


async def test_invalid_arguments(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        await limiter.hit("k", RateLimits(requests_per_minute=0), 1)
    with pytest.raises(ValueError):
        await limiter.hit("k", RateLimits(requests_per_minute=5), -1)


async def test_explicit_async_storage_uri_is_accepted() -> None:
    limiter = RateLimiter("async+memory://")
    assert (await limiter.hit("k", RateLimits(requests_per_minute=1), 0)).allowed
    await limiter.close()


async def test_refund_never_reaches_a_later_window(limiter: RateLimiter) -> None:
    limits = RateLimits(tokens_per_minute=100)
    await limiter.hit("k", limits, 80)
    # Counted in a window that ended before this one: nothing to give back here.
    await limiter.adjust_tokens("k", limits, -50, window_end=time.time() - 5)
    assert (await limiter.hit("k", limits, 0)).remaining_tokens == 20


async def test_three_replicas_on_redis_admit_the_limit_not_three_times_it() -> None:
    with redis_prefix() as prefix:
        replicas = [RateLimiter(REDIS_URL, key_prefix=f"LIMITS:{prefix}") for _ in range(3)]
        try:
            limits = RateLimits(requests_per_minute=60, tokens_per_minute=10_000)
            states = await asyncio.gather(
                *(replicas[i % 3].hit("tenant:t", limits, 50) for i in range(180))
            )
            assert sum(s.allowed for s in states) == 60
            refused = [s for s in states if not s.allowed]
            assert all(s.retry_after_s is not None and 1 <= s.retry_after_s <= 60 for s in refused)
            assert all(s.headers()["x-ratelimit-remaining-requests"] == "0" for s in refused)
            after = await replicas[1].hit("tenant:t", RateLimits(tokens_per_minute=10_000), 0)
            assert after.remaining_tokens == 10_000 - 60 * 50  # refused hits consumed nothing
        finally:
            for replica in replicas:
                await replica.close()


async def test_redis_outage_raises_store_unavailable_and_recovers() -> None:
    with redis_prefix() as prefix, proxy_for(REDIS_URL) as proxy:
        limiter = RateLimiter(proxy.url_for(REDIS_URL), key_prefix=f"LIMITS:{prefix}", timeout_s=1)
        try:
            limits = RateLimits(requests_per_minute=5)
            assert (await limiter.hit("k", limits, 0)).allowed
            proxy.cut()
            with pytest.raises(StoreUnavailable):
                await limiter.hit("k", limits, 0)
            with pytest.raises(StoreUnavailable):
                await limiter.check()
            proxy.restore()
            await limiter.check()
            assert (await limiter.hit("k", limits, 0)).remaining_requests == 3
        finally:
            await limiter.close()


def test_in_process_storage_starts_no_expiry_threads_and_still_drops_expired_counters() -> None:
    import threading

    from budgets._memory import InlineExpiryMemoryStorage

    storage = InlineExpiryMemoryStorage()
    for i in range(50):
        assert storage.incr(f"k{i % 5}", 0.01, amount=2) >= 2
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    time.sleep(0.02)
    assert storage.get("k0") == 0  # expired counters read as empty at once
    storage._next_sweep = 0.0  # the next change sweeps (at most once a second otherwise)
    storage.incr("fresh", 60)
    assert set(storage.storage) == {"fresh"} and set(storage.expirations) == {"fresh"}
    assert storage.decr("fresh") == 0
