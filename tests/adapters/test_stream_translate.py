"""Stream translation edge cases that real upstreams produce (beyond the golden files)."""
from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from adapters import naming
from adapters.anthropic import build_messages_request
from adapters.base import Endpoint, UpstreamError
from adapters.canonical import MessageStart, MessageStop
from adapters.http import UpstreamClient
from adapters.sse_anthropic import AnthropicStreamRenderer
from adapters.stream_translate import anthropic_to_openai, openai_to_anthropic
from tests.fakeupstream import Behaviour, FakeUpstream


def chunk(delta: dict[str, Any], finish: str | None = None, cid: str = "gen-1") -> bytes:
    return b"data: " + orjson.dumps({"id": cid, "model": "local", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def anthropic_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            out.append((name[7:], json.loads(data[6:])))
    return out


def test_openai_compatible_stream_without_done_still_completes() -> None:
    """llama.cpp-style servers may close after the finish chunk and never send [DONE] or usage."""
    tap = openai_to_anthropic(names={}, input_estimate=5, count_text=lambda text: len(text.split()))
    out = tap.feed(chunk({"role": "assistant", "content": "one two"}) + chunk({}, "stop")) + tap.flush()
    events = anthropic_events(out)
    assert [name for name, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                            "content_block_stop", "message_delta", "message_stop"]
    assert events[4][1]["usage"]["output_tokens"] == 2 and events[4][1]["usage"]["input_tokens"] == 5
    assert tap.done and tap.usage is None  # counted for the client; the ledger counts it again, marked estimated


@pytest.mark.parametrize(("upstream_id", "expect_same"), [("", False), ("call_ok-1", True), ("tool call/1", False)])
def test_tool_call_ids_from_openai_compatible_servers(upstream_id: str, expect_same: bool) -> None:
    tap = openai_to_anthropic(names={}, input_estimate=5, count_text=len)
    call = {"index": 0, "id": upstream_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = tap.feed(chunk({"tool_calls": [call]}) + chunk({}, "tool_calls") + b"data: [DONE]\n\n")
    block = anthropic_events(out)[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["id"] and all(ch.isalnum() or ch in "_-" for ch in block["id"])
    assert (block["id"] == upstream_id) is expect_same
    if upstream_id:  # what the client sends back in its tool_result reaches the upstream as it was
        assert naming.original_tool_id(block["id"]) == upstream_id


def test_text_after_a_tool_call_opens_a_new_block_in_order() -> None:
    tap = openai_to_anthropic(names={}, input_estimate=5, count_text=len)
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = tap.feed(chunk({"tool_calls": [call]}) + chunk({"content": "and text"}) + chunk({}, "tool_calls")
                   + b"data: [DONE]\n\n")
    events = [(name, data.get("index")) for name, data in anthropic_events(out)]
    assert events == [("message_start", None), ("content_block_start", 0), ("content_block_delta", 0),
                      ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
                      ("content_block_stop", 1), ("message_delta", None), ("message_stop", None)]


def test_message_stop_without_message_delta_still_sends_one() -> None:
    renderer = AnthropicStreamRenderer(names={}, input_estimate=3)
    renderer.render(MessageStart("m", "x"))
    frames = renderer.render(MessageStop()).decode()
    assert frames.index("event: message_delta") < frames.index("event: message_stop")


def test_openai_tool_call_header_only_in_first_fragment() -> None:
    frames = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":3}}}',
        (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}'),
        *[b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
          b'"delta":{"type":"input_json_delta","partial_json":"' + piece + b'"}}' for piece in (b"{", b"}")],
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":4}}',
        b'event: message_stop\ndata: {"type":"message_stop"}',
    ]
    tap = anthropic_to_openai(names={}, client_wants_usage=False, created=1, input_estimate=3, count_text=len)
    out = tap.feed(b"\n\n".join(frames) + b"\n\n").decode()
    calls = [json.loads(line[6:])["choices"][0]["delta"]["tool_calls"][0]
             for line in out.split("\n\n") if '"tool_calls":[' in line]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert calls[1:] == [{"index": 0, "function": {"arguments": "{"}}, {"index": 0, "function": {"arguments": "}"}}]
    assert out.endswith("data: [DONE]\n\n") and tap.usage is not None and tap.usage.output_tokens == 4


async def test_anthropic_error_envelope_through_the_upstream_client() -> None:
    """Anthropic's 529 `overloaded_error` is a retryable UpstreamError carrying the error type.

    (aioresponses 0.7.9 cannot mock aiohttp 3.14, so this runs the real fake upstream in-process.)
    """
    async with FakeUpstream() as up:
        up.script(Behaviour(status=529, headers={"retry-after": "3"}))
        endpoint = Endpoint("anthro", "anthropic", up.url, "sk-ant")
        request = build_messages_request(endpoint, {"model": "c", "max_tokens": 5, "messages": []}, "claude-x",
                                         beta="tools-2024-04-04")
        client = UpstreamClient()
        await client.start()
        try:
            with pytest.raises(UpstreamError) as info:
                await client.send(request, timeout_s=5, connect_timeout_s=1)
        finally:
            await client.close()
        sent = up.attempts[-1]
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (529, "overloaded_error", 3.0)
    assert info.value.retryable
    assert (sent["path"], sent["headers"]["x-api-key"], sent["headers"]["anthropic-beta"]) == (
        "/v1/messages", "sk-ant", "tools-2024-04-04")
