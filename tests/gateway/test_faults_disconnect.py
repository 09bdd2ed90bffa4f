"""Issue 6: a client that leaves a non-streamed request cancels the upstream call too (within
about a second), its reservation is released and the audit says `client_disconnected`. The fast
path pays nothing for it: a call answered within `after_s` never gets a watch task. A client
disconnect whose cancellation is swallowed on the way (asyncio.wait_for on Python 3.11, inside
redis-py) still ends the request."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.streaming import DisconnectWatch, RelayResponse, SlowCallWatch
from tests.gateway.faultkit import HI, audit_rows, ledger, post_chat, wait_for
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess


def _reserved(gw: RunningGateway) -> list[tuple[int, Any]]:
    rt = gw.runtime
    assert rt.loop is not None
    balances = asyncio.run_coroutine_threadsafe(
        rt.ledger.balance("team", rt.tenants["team"].budget_limits, datetime.now(UTC)), rt.loop).result(5)
    return [(b.reserved_tokens, b.reserved_usd) for b in balances]


def test_client_leaving_a_long_non_streamed_request_cancels_the_upstream(
        gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"delay_ms": 8000})  # the upstream is still thinking when the client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                   json={"model": "mock-a", "messages": HI}, timeout=0.5)
    left = time.time()
    attempt = wait_for(lambda: upstream.attempts()[0] if upstream.attempts()[0]["ended"] else None, timeout=4)
    assert attempt["client_gone"] and attempt["ended"] - left < 1.0
    record = wait_for(lambda: audit_rows(gateway))[0]
    assert (record["outcome"], record["status"]) == ("client_disconnected", 499)
    rt = gateway.runtime
    assert wait_for(lambda: rt.in_flight == 0 and rt.shedder.active == 0 and rt.slow_calls.watching == 0)
    assert _reserved(gateway) == [(0, 0)]  # the reservation is released
    assert ledger(gateway) == []  # nothing was produced, nothing is charged
    assert post_chat(gateway, "mock-a").status_code == 200 and rt.breakers.closed("mock-a")


def test_a_slow_answer_the_client_waits_for_is_served(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    """Armed but the client stays: the answer arrives as usual."""
    upstream.script({"delay_ms": 1500})
    resp = post_chat(gateway, "mock-a")
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    assert wait_for(lambda: audit_rows(gateway))[0]["outcome"] == "ok"
    assert gateway.runtime.slow_calls.watching == 0


class _Receive:
    def __init__(self, disconnect_after: float | None) -> None:
        self.calls = 0
        self._after = disconnect_after

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self._after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self._after or 0)
        return {"type": "http.disconnect"}


async def test_a_quick_call_never_gets_a_watch() -> None:
    watch = SlowCallWatch(after_s=0.2)
    receive = _Receive(None)
    ex = SimpleNamespace(watch=None)
    tasks_before = len(asyncio.all_tasks())
    assert await watch.during(ex, receive, asyncio.sleep(0.01, "answer")) == "answer"
    assert ex.watch is None and receive.calls == 0 and watch.watching == 0
    assert len(asyncio.all_tasks()) == tasks_before + 1  # only the one sweeper, shared by every request
    assert await watch.during(ex, receive, asyncio.sleep(0.5, "late")) == "late"  # long: watched, then stopped
    assert ex.watch is not None and ex.watch.done and receive.calls == 1
    await watch.close()


async def test_a_long_call_is_cancelled_when_the_client_leaves() -> None:
    watch = SlowCallWatch(after_s=0.2)
    ex = SimpleNamespace(watch=None)
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await watch.during(ex, _Receive(0.1), asyncio.sleep(10))
    assert time.monotonic() - t0 < 1.0
    assert ex.watch is not None and ex.watch.absorb()  # the watch's doing: the pipeline answers 499
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await watch.close()


async def test_a_watched_stream_passes_through() -> None:
    watch = SlowCallWatch(after_s=0.05)
    marker = SimpleNamespace(stop=lambda: None, cancel_lost=False)
    ex = SimpleNamespace(watch=marker)
    assert await watch.during(ex, _Receive(None), asyncio.sleep(0.2, "stream")) == "stream"
    assert ex.watch is marker and watch.watching == 0
    await watch.close()


async def _swallows_a_cancellation() -> str:
    """What asyncio.wait_for does on Python 3.11 when its call finishes as the cancellation arrives
    (redis-py wraps every command in it): the CancelledError is lost, the result returned."""
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        return "swallowed"
    return "not cancelled"


async def test_a_cancellation_lost_during_admission_still_stops_before_the_upstream_call() -> None:
    watch = DisconnectWatch(_Receive(0.05))  # a stream's watch, on this task
    ex = SimpleNamespace(watch=watch)
    assert await _swallows_a_cancellation() == "swallowed"  # e.g. the Redis rate-limit hit
    called: list[bool] = []

    async def upstream_call() -> str:
        called.append(True)
        return "answer"

    with pytest.raises(asyncio.CancelledError):
        await SlowCallWatch().during(ex, _Receive(None), upstream_call())
    assert called == [] and watch.absorb()  # never sent upstream; the pipeline answers 499
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    watch.stop()


async def test_a_relay_whose_cancellation_was_lost_stops_at_the_next_chunk() -> None:
    ended: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"data: one\n\n"
            yield (await _swallows_a_cancellation()).encode()  # the client leaves here; the cancel is lost
            for i in range(50):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n".encode()
        finally:
            ended.append("finally")  # settle + audit in the real relay

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    receive = _Receive(0.05)
    response = RelayResponse(body())  # its watch is made on the task that serves it
    await asyncio.wait_for(response({"type": "http"}, receive, send), 2)  # absorbed: not an error
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"data: one\n\n"] and ended == ["finally"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
