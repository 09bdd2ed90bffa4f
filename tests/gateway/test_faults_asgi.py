"""Issue 6, at the ASGI boundary: a stream whose response never starts (the send of the response
start fails, or the client is gone before the first chunk) is still ended like any other: the
upstream call closed, the reservation settled, the audit row written, the capacity slot freed.
The app is driven directly (no HTTP server), so the failure lands exactly where it is wanted."""
from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.app import HotPaths, create_app
from gateway.audit import read_audit
from gateway.config import load_config
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.gateway.faultkit import HI, WORDS
from tests.harness import ADMIN_KEY, TENANT_KEY, UpstreamProcess, write_config

Message = dict[str, Any]


@pytest.fixture
async def served(tmp_path: Path, gw_config: dict[str, Any]) -> AsyncIterator[tuple[Runtime, HotPaths]]:
    os.environ.setdefault("TEST_UPSTREAM_KEY", "sk-upstream-secret-test")
    os.environ["TEST_GATEWAY_ADMIN_KEY"] = ADMIN_KEY
    rt = Runtime(load_config(write_config(tmp_path, gw_config)), Settings(flush_interval_s=0.02, keys_refresh_s=0.5))
    app = create_app(rt)
    await rt.start()
    try:
        yield rt, app
    finally:
        await rt.close()


def _scope(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000),
            "headers": [(b"authorization", f"Bearer {TENANT_KEY}".encode()), (b"content-type", b"application/json")]}


class Client:
    """One ASGI connection: the request body, then `http.disconnect` once `gone` is set."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = orjson.dumps(body)
        self._sent = False
        self.gone = asyncio.Event()
        self.messages: list[Message] = []

    async def receive(self) -> Message:
        if not self._sent:
            self._sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def _ended(rt: Runtime, upstream: UpstreamProcess) -> dict[str, Any]:
    """Waits until the request is over everywhere; returns its one audit record."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while rt.in_flight or rt.shedder.active or not (upstream.attempts() and upstream.attempts()[0]["ended"]):
        if loop.time() > deadline:
            ends = [(a["ended"], a["client_gone"]) for a in upstream.attempts()]
            raise AssertionError(f"not ended: in_flight={rt.in_flight} active={rt.shedder.active} upstream={ends}")
        await asyncio.sleep(0.02)
    await rt.audit.flush()
    records = read_audit(rt.db_path)
    assert len(records) == 1
    return records[0]


async def _assert_settled(rt: Runtime) -> None:
    tenant = rt.tenants["team"]
    balances = await rt.ledger.balance("team", tenant.budget_limits, datetime.now(UTC))
    assert balances and all(b.reserved_usd == 0 and b.reserved_tokens == 0 for b in balances)  # nothing held
    await rt.ledger.flush()
    conn = sqlite3.connect(rt.db_path)
    try:
        rows = conn.execute("SELECT status, output_tokens FROM ledger_entries").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1 and rows[0][0] == "client_disconnected" and rows[0][1] > 0  # the preamble's content


SLOW_STREAM = {"model": "mock-a", "stream": True, "messages": HI, "x_fake": {"text": WORDS, "chunk_interval_ms": 50}}


async def test_send_failing_on_the_response_start_still_ends_the_request(
        served: tuple[Runtime, HotPaths], upstream: UpstreamProcess) -> None:
    rt, app = served
    client = Client(SLOW_STREAM)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            raise OSError(104, "Connection reset by peer")
        client.messages.append(message)

    with pytest.raises(OSError):
        await app(_scope(), client.receive, send)
    record = await _ended(rt, upstream)
    assert (record["outcome"], record["status"]) == ("client_disconnected", 499)
    assert upstream.attempts()[0]["client_gone"]  # the upstream call was closed, not read to its end
    await _assert_settled(rt)
    assert rt.open_streams == {} and client.messages == []


async def test_client_gone_before_the_first_chunk_still_ends_the_request(
        served: tuple[Runtime, HotPaths], upstream: UpstreamProcess) -> None:
    rt, app = served
    client = Client(SLOW_STREAM)

    async def send(message: Message) -> None:
        client.messages.append(message)
        if message["type"] == "http.response.start":  # the client hangs up while the headers go out
            client.gone.set()
            await asyncio.sleep(0.2)

    await asyncio.wait_for(app(_scope(), client.receive, send), 5)  # the disconnect is not an error
    record = await _ended(rt, upstream)
    assert (record["outcome"], record["status"]) == ("client_disconnected", 499)
    assert upstream.attempts()[0]["client_gone"]
    await _assert_settled(rt)
    assert [m["type"] for m in client.messages] == ["http.response.start"]


async def test_a_normal_stream_still_ends_once(served: tuple[Runtime, HotPaths], upstream: UpstreamProcess) -> None:
    """The unstarted-stream ending must never run as well as the relay's own (leave() twice)."""
    rt, app = served
    client = Client({"model": "mock-a", "stream": True, "messages": HI})
    sent: list[Message] = []
    send: Callable[[Message], Awaitable[None]] = _collect(sent)
    await app(_scope(), client.receive, send)
    body = b"".join(m.get("body", b"") for m in sent)
    assert body.rstrip().endswith(b"data: [DONE]")
    record = await _ended(rt, upstream)
    assert record["outcome"] == "ok" and rt.in_flight == 0 and rt.shedder.active == 0


def _collect(into: list[Message]) -> Callable[[Message], Awaitable[None]]:
    async def send(message: Message) -> None:
        into.append(message)

    return send
