"""The `anthropic` provider adapter: upstream requests, usage, the pass-through stream tap."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.anthropic import (
    ANTHROPIC_VERSION,
    MessagesStreamTap,
    build_count_tokens_request,
    build_messages_request,
    message_text,
)
from adapters.base import Endpoint

ENDPOINT = Endpoint(provider="anthro", type="anthropic", base_url="https://api.anthropic.test", api_key="sk-ant-test")
BODY: dict[str, Any] = {"model": "claude-alias", "max_tokens": 64, "system": [{"type": "text", "text": "S",
                        "cache_control": {"type": "ephemeral"}}], "thinking": {"type": "enabled", "budget_tokens": 1024},
                        "messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "u"}, "top_k": 3}


@pytest.mark.parametrize(("base_url", "url"), [
    ("https://api.anthropic.test", "https://api.anthropic.test/v1/messages"),
    ("https://api.anthropic.test/", "https://api.anthropic.test/v1/messages"),
    ("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/messages"),
])
def test_messages_url(base_url: str, url: str) -> None:
    endpoint = Endpoint("a", "anthropic", base_url, None)
    assert build_messages_request(endpoint, BODY, "claude-x").url == url


def test_body_is_forwarded_unchanged_apart_from_the_model() -> None:
    request = build_messages_request(ENDPOINT, BODY, "claude-sonnet-4-5", beta="prompt-caching-2024-07-31")
    sent = orjson.loads(request.body)
    assert sent == {**BODY, "model": "claude-sonnet-4-5"} and list(sent) == list(BODY)
    assert request.headers == {"content-type": "application/json", "accept": "application/json",
                               "anthropic-version": ANTHROPIC_VERSION, "x-api-key": "sk-ant-test",
                               "anthropic-beta": "prompt-caching-2024-07-31"}
    assert not request.stream and "authorization" not in request.headers


def test_stream_request_accepts_sse_and_has_no_beta_unless_given() -> None:
    request = build_messages_request(ENDPOINT, {**BODY, "stream": True}, "claude-x")
    assert request.stream and request.headers["accept"] == "text/event-stream"
    assert "anthropic-beta" not in request.headers


def test_count_tokens_request_keeps_what_is_counted_only() -> None:
    request = build_count_tokens_request(ENDPOINT, {**BODY, "tools": [{"name": "t", "input_schema": {}}]}, "claude-x")
    assert request.url.endswith("/v1/messages/count_tokens")
    assert orjson.loads(request.body) == {"model": "claude-x", "system": BODY["system"], "thinking": BODY["thinking"],
                                          "messages": BODY["messages"], "tools": [{"name": "t", "input_schema": {}}]}


def _frames(case: str) -> bytes:
    golden = json.loads((Path(__file__).parent / "golden" / "openai_client__anthropic_upstream" / f"{case}.json").read_text())
    return "".join(frame + "\n\n" for frame in golden["stream_in"]).encode()


@pytest.mark.parametrize("size", [1, 5, 64, 100000])
def test_tap_forwards_bytes_unchanged_and_reads_usage(size: int) -> None:
    raw = _frames("tools_streamed")
    tap = MessagesStreamTap()
    out = b"".join(tap.feed(raw[i:i + size]) for i in range(0, len(raw), size)) + tap.flush()
    assert out == raw
    assert tap.done and not tap.error_seen and tap.content_started
    assert tap.usage is not None and (tap.usage.input_tokens, tap.usage.output_tokens) == (300, 58)
    assert "".join(tap.text_parts) == 'Checking.{"city": "Paris"}{"tz":"Asia/Tokyo"}'


def test_tap_cache_usage_is_merged_from_message_start_and_delta() -> None:
    start = {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 10, "cache_read_input_tokens": 900,
                                                                       "cache_creation_input_tokens": 50, "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 12}}
    tap = MessagesStreamTap()
    tap.feed(b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n")
    assert tap.usage is None  # provisional until message_delta: an interrupted stream is counted instead
    tap.feed(b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
    assert tap.usage is not None
    assert (tap.usage.input_tokens, tap.usage.cached_input_tokens, tap.usage.cache_write_tokens,
            tap.usage.output_tokens) == (60, 900, 50, 12)
    assert tap.usage.raw == {"input_tokens": 10, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 50,
                             "output_tokens": 12}


def test_tap_notes_an_error_event() -> None:
    tap = MessagesStreamTap()
    tap.feed(_frames("stream_error"))
    assert tap.error_seen and not tap.done


def test_message_text_counts_text_and_tool_input() -> None:
    assert message_text({"content": [{"type": "text", "text": "a"}, {"type": "tool_use", "name": "f", "input": {"x": 1}},
                                     {"type": "thinking", "thinking": "t"}]}) == 'af{"x":1}'
