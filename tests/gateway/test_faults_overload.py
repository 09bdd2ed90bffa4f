"""Issue 6: overload shedding. A per-replica cap on requests in progress and on requests
waiting; past it the gateway answers fast (503 OpenAI format, 529 overloaded_error Anthropic
format) instead of queueing without bound, and /healthz stays fast."""
from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway.faultkit import (
    HI,
    ac,
    metric_value,
    metrics,
    oc,
    post_chat,
    wait_for,
)
from tests.harness import RunningGateway, UpstreamProcess

CAPS = {"max_active_requests": 2, "max_queued_requests": 1, "queue_timeout_s": 0.5}


@pytest.fixture
def gw(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(**CAPS)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def test_past_the_caps_requests_are_refused_fast(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"delay_ms": 1500}] * 3)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = [pool.submit(post_chat, gw, "mock-a") for _ in range(2)]
        wait_for(lambda: len(upstream.attempts()) == 2)
        queued = pool.submit(timed, lambda: post_chat(gw, "mock-a"))
        wait_for(lambda: gw.runtime.shedder.queued == 1)
        shed = [pool.submit(timed, lambda: post_chat(gw, "mock-a")) for _ in range(4)]
        health = [timed(lambda: httpx.get(f"{gw.url}/healthz", timeout=5)) for _ in range(5)]
        for future in shed:
            resp, took = future.result()
            # Refused at once, not after the 0.5 s queue wait: the gateway's own time says so
            # (the client-side time also holds thread-pool and connection set-up on a busy box).
            assert resp.status_code == 503 and float(resp.headers["x-gateway-overhead-ms"]) < 100 and took < 1.0
            assert resp.json()["error"]["code"] == "overloaded" and resp.headers["retry-after"] == "1"
        resp, took = queued.result()
        assert resp.status_code == 503 and 0.4 < took < 1.4  # waited its turn (0.5 s), then refused
        assert [f.result().status_code for f in held] == [200, 200]
    assert all(r.status_code == 200 and took < 0.2 for r, took in health)
    assert len(upstream.attempts()) == 2  # nothing shed reached the upstream
    text = metrics(gw)
    assert metric_value(text, "gateway_shed_requests_total", reason="queue_full") == 4
    assert metric_value(text, "gateway_shed_requests_total", reason="queue_timeout") == 1
    assert metric_value(text, "gateway_active_requests") == 0
    assert gw.runtime.in_flight == 0


def test_a_queued_request_gets_the_next_free_slot(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"delay_ms": 300}, {"delay_ms": 300})
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post_chat, gw, "mock-a") for _ in range(2)]
        wait_for(lambda: len(upstream.attempts()) == 2)
        queued = pool.submit(post_chat, gw, "mock-a")
        assert queued.result().status_code == 200
        assert [f.result().status_code for f in held] == [200, 200]


def test_sdks_see_their_own_overload_errors(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"delay_ms": 1500}] * 2)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        held = [pool.submit(post_chat, gw, "mock-a") for _ in range(2)]
        wait_for(lambda: len(upstream.attempts()) == 2)
        blocker = pool.submit(post_chat, gw, "mock-a")  # fills the queue
        wait_for(lambda: gw.runtime.shedder.queued == 1)
        with pytest.raises(openai.InternalServerError) as oa_info:
            oc(gw).chat.completions.create(model="mock-a", messages=HI)
        assert oa_info.value.status_code == 503
        with pytest.raises(anthropic.InternalServerError) as an_info:
            ac(gw).messages.create(model="mock-a", max_tokens=10, messages=HI)
        assert an_info.value.status_code == 529
        assert an_info.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
            "type": "overloaded_error", "message": "the gateway is at capacity; retry shortly"}}
        blocker.result()
        [f.result() for f in held]


def test_streams_hold_their_slot_until_their_last_byte(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": " ".join(f"w{i}" for i in range(30)), "chunk_interval_ms": 30})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(lambda: list(oc(gw).chat.completions.create(model="mock-a", messages=HI, stream=True)))
        wait_for(lambda: gw.runtime.shedder.active == 1)
        time.sleep(0.3)
        assert gw.runtime.shedder.active == 1  # mid-stream: still counted
        assert len(stream.result()) > 30
    wait_for(lambda: gw.runtime.shedder.active == 0)
