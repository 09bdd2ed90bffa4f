"""Issue 6, piece by piece: the error classification table, backoff, the breaker state machine
(injected clock), the shedder, and dispatch's waits against the in-process fake upstream with a
recording sleep (so the retry-after honoured is measured, not waited for)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapters.base import Endpoint, UpstreamError
from adapters.http import UpstreamClient, context_overflow
from gateway.breaker import Breakers, BreakerSettings
from gateway.config import ModelConfig
from gateway.dispatch import (
    MAX_HONOURED_RETRY_AFTER_S,
    Target,
    backoff,
    classify,
    dispatch,
)
from gateway.errors import UpstreamFailed
from gateway.parsing import parse_chat
from gateway.shedding import Overloaded, Shedder
from routing_policies import Candidate
from tests.fakeupstream import Behaviour, FakeUpstream


def status(code: int, err: str | None = None, detail: str = "", retry_after: float | None = None) -> UpstreamError:
    return UpstreamError("status", status=code, code=err, detail=detail, retry_after_s=retry_after)


@pytest.mark.parametrize(("exc", "action"), [
    (UpstreamError("connect"), "retry"),
    (UpstreamError("timeout"), "retry"),
    (UpstreamError("closed"), "retry"),
    (UpstreamError("protocol"), "retry"),  # an error event or empty stream before content
    (status(429, "rate_limit_exceeded"), "retry"),
    (status(429, "insufficient_quota"), "refused"),
    *[(status(code), "retry") for code in (500, 502, 503, 504, 529, 408)],
    (status(401, "invalid_api_key"), "refused"),
    (status(403), "refused"),
    (status(400, "context_length_exceeded"), "context"),
    (status(400, None, '{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: '
                       '210000 tokens > 200000 maximum"}}'), "context"),
    (status(400, "invalid_value"), "reject"),
    (status(422), "reject"),
    (status(400, "content_filter"), "reject"),
    (status(404, "model_not_found"), "fallover"),
])
def test_classification_table(exc: UpstreamError, action: str) -> None:
    assert classify(exc) == action


def test_context_overflow_reads_the_token_count_when_given() -> None:
    exc = status(400, "context_length_exceeded", "maximum context length is 8192 tokens. However, your messages "
                                                 "resulted in 9100 tokens")
    assert context_overflow(exc) == (True, 9100)
    assert context_overflow(status(400, "invalid_value", "bad temperature")) == (False, None)


def test_backoff_honours_short_retry_after_and_jitters_otherwise() -> None:
    assert backoff(status(429, retry_after=0.3), 1) == 0.3
    assert backoff(status(429, retry_after=30), 1) == MAX_HONOURED_RETRY_AFTER_S  # never waited: dispatch moves on
    waits = [backoff(status(503), 1) for _ in range(200)]
    assert 0 <= min(waits) and max(waits) <= 0.05 and len(set(waits)) > 100  # jitter
    assert max(backoff(status(503), 5) for _ in range(200)) <= 0.8


# ---------------------------------------------------------------- breaker state machine
@dataclass
class Holder:
    catalog: dict[str, Candidate] = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def candidate(name: str, provider: str) -> Candidate:
    from decimal import Decimal

    return Candidate(name, provider, "local", "local", 1, frozenset({"chat"}), 8192, 256, Decimal(0), Decimal(0))


def breakers(**settings: Any) -> tuple[Breakers, Holder, Clock]:
    holder = Holder({"a": candidate("a", "p"), "b": candidate("b", "p"), "c": candidate("c", "q")})
    clock = Clock()
    return Breakers({"a": "p", "b": "p", "c": "q"}, holder, BreakerSettings(**settings), clock=clock), holder, clock


def test_breaker_opens_grows_probes_and_closes() -> None:
    b, holder, clock = breakers(failure_threshold=3, cooldown_s=5, max_cooldown_s=12)
    for _ in range(2):
        b.failed("a")
    assert b.admit("a") and holder.catalog["a"].breaker is None
    b.failed("a")
    assert not b.admit("a") and holder.catalog["a"].breaker == "circuit open: 3 failures in a row"
    assert b.open_count == 1
    clock.now += 5
    assert b.admit("a")  # half-open: the probe
    assert not b.admit("a")  # only one
    b.failed("a")  # probe failed: open for 10 s
    clock.now += 9.9
    assert not b.admit("a")
    clock.now += 0.2
    assert b.admit("a")
    b.failed("a")  # 20 s, capped at 12
    clock.now += 11.9
    assert not b.admit("a")
    clock.now += 0.2
    assert b.admit("a")
    b.succeeded("a")
    assert b.closed("a") and b.open_count == 0 and holder.catalog["a"].breaker is None
    b.failed("a")
    b.failed("a")
    b.failed("a")  # re-opened after a close: the cooldown starts small again
    clock.now += 5
    assert b.admit("a")


def test_successes_reset_the_run_and_a_cancelled_probe_frees_the_slot() -> None:
    b, _, clock = breakers(failure_threshold=2, cooldown_s=1)
    b.failed("a")
    b.succeeded("a")
    b.failed("a")
    assert b.closed("a")
    b.failed("a")
    clock.now += 1
    assert b.admit("a") and not b.admit("a")
    b.released("a")
    assert b.admit("a")


def test_error_ratio_counts_the_previous_window_too() -> None:
    b, _, clock = breakers(failure_threshold=99, error_ratio=0.5, window_s=10, min_requests=4)
    b.succeeded("a")
    b.failed("a")
    clock.now += 10.5  # a new window: the previous one still counts
    b.succeeded("a")
    assert b.closed("a")
    b.failed("a")
    assert not b.closed("a")
    b2, _, clock2 = breakers(failure_threshold=99, error_ratio=0.5, window_s=10, min_requests=4)
    b2.failed("a")
    b2.failed("a")
    clock2.now += 25  # both windows gone
    b2.succeeded("a")
    b2.failed("a")
    assert b2.closed("a")


def test_refused_provider_opens_all_its_models_and_is_never_revived() -> None:
    b, holder, clock = breakers(key_cooldown_s=60)
    b.provider_refused("p", "refused the gateway's key (HTTP 401)")
    assert not b.admit("a") and not b.admit("b") and b.admit("c")
    assert holder.catalog["b"].breaker == "circuit open: provider refused the gateway's key (HTTP 401)"
    assert b.least_recently_failed(["a", "b"]) is None
    b.failed("c")
    assert b.least_recently_failed(["a", "c"]) == "c"
    clock.now += 60
    assert b.admit("a")


def test_least_recently_failed_is_the_oldest_failure() -> None:
    b, _, clock = breakers(failure_threshold=1)
    b.failed("b")
    clock.now += 1
    b.failed("a")
    assert b.least_recently_failed(["a", "b"]) == "b"


def test_adopting_another_replicas_open_state() -> None:
    b, holder, _ = breakers()
    import time

    b.adopt("a", {"state": "open", "until_wall": time.time() + 30, "reason": "circuit open: 5 failures in a row",
                  "changed_wall": time.time(), "opens": 1})
    assert not b.admit("a") and holder.catalog["a"].breaker == "circuit open: 5 failures in a row"
    assert b.outbox == {}  # adopted changes are not shared back
    b.adopt("a", {"state": "closed", "changed_wall": time.time() + 1})
    assert b.closed("a")
    b.adopt("b", {"state": "open", "until_wall": time.time() - 1, "changed_wall": time.time()})  # expired
    assert b.closed("b")


# ---------------------------------------------------------------- shedder
async def test_shedder_queues_hands_over_and_refuses() -> None:
    shed = Shedder(1, 1, 0.2)
    assert shed.try_acquire() and not shed.try_acquire()
    waiter = asyncio.create_task(shed.acquire("openai"))
    await asyncio.sleep(0)
    assert shed.queued == 1
    with pytest.raises(Overloaded) as info:
        await shed.acquire("anthropic")  # the queue is full
    assert info.value.status == 529
    shed.release()  # the slot goes to the waiter
    await waiter
    assert shed.active == 1 and shed.queued == 0
    with pytest.raises(Overloaded) as info:
        await shed.acquire("openai")  # waits 0.2 s in line, then refused
    assert info.value.status == 503 and shed.queued == 0
    shed.release()
    assert shed.active == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    shed = Shedder(1, 5, 5)
    assert shed.try_acquire()
    waiter = asyncio.create_task(shed.acquire("openai"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert shed.queued == 0
    shed.release()
    assert shed.active == 0


# ---------------------------------------------------------------- dispatch waits (recorded, not slept)
async def run_dispatch(up: FakeUpstream, names: list[str], *behaviours: Behaviour,
                       **kw: Any) -> tuple[Any, list[float]]:
    up.script(*behaviours)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(round(seconds, 3))

    endpoint = Endpoint("p", "openai_compatible", f"{up.url}/v1", None, timeout_s=5)
    targets = [Target(ModelConfig(name=n, provider="p", upstream_model=n), endpoint) for n in names]
    client = UpstreamClient()
    await client.start()
    try:
        parsed = parse_chat(b'{"model": "x", "messages": [{"role": "user", "content": "hi"}]}')
        try:
            result: Any = await dispatch(client, targets, parsed, max_attempts=3, sleep=record, **kw)
        except UpstreamFailed as exc:
            result = exc
    finally:
        await client.close()
    return result, waits


async def test_dispatch_waits_the_short_retry_after_and_skips_the_long_one() -> None:
    async with FakeUpstream() as up:
        result, waits = await run_dispatch(up, ["a", "b"], Behaviour(status=429, headers={"retry-after-ms": "300"}))
        assert result.target.model.name == "a" and waits == [0.3]
        result, waits = await run_dispatch(up, ["a", "b"], Behaviour(status=429, headers={"retry-after": "30"}))
        assert result.target.model.name == "b" and waits == []
        result, waits = await run_dispatch(up, ["a"], *[Behaviour(status=503)] * 3)
        assert isinstance(result, UpstreamFailed) and len(waits) == 1 and 0 <= waits[0] <= 0.05


async def test_dispatch_skips_open_breakers_and_forces_one_when_all_are_open() -> None:
    async with FakeUpstream() as up:
        holder = Holder({n: candidate(n, "p") for n in ("a", "b")})
        brk = Breakers({"a": "p", "b": "p"}, holder, BreakerSettings(failure_threshold=1, cooldown_s=60))
        brk.failed("a")
        result, _ = await run_dispatch(up, ["a", "b"], breakers=brk)
        assert result.target.model.name == "b" and [a["model"] for a in up.attempts] == ["b"]
        brk.failed("b")
        result, _ = await run_dispatch(up, ["a", "b"], breakers=brk)
        assert result.target.model.name == "a"  # both open: the least recently failed
        assert brk.closed("a") and not brk.closed("b")
        brk.close()


def test_bare_500s_count_toward_the_ratio_only() -> None:
    """llama-cpp-python answers malformed requests with 500: a few of them must not open its breaker."""
    b, _, _ = breakers(failure_threshold=3, min_requests=10, error_ratio=0.5)
    for _ in range(6):
        b.failed("a", in_a_row=False)
    assert b.closed("a")
    for _ in range(4):
        b.failed("a", in_a_row=False)
    assert not b.closed("a")  # 10 of 10 attempts failed: a broken server still trips the ratio
