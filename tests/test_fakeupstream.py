"""Tests of the fake upstream used by the gateway's tests and benchmarks (loopback only)."""
from __future__ import annotations

import asyncio
import base64
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakeupstream import DEFAULT_TEXT, Behaviour, FakeUpstream, prompt_tokens

CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "What is the weather in Paris?"}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ANTHROPIC: dict[str, Any] = {"model": "claude-mock", "max_tokens": 100, "system": "Be brief.",
             "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]}
A_TOOLS = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
WORDS = len(DEFAULT_TEXT.split())


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def sse_data(raw: bytes) -> list[str]:
    frames = raw.decode().split("\n\n")
    assert frames[-1] == ""
    return [f.removeprefix("data: ") for f in frames[:-1]]


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.decode().split("\n\n")[:-1]:
        event, data = frame.split("\n")
        out.append((event.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return out


async def post(http: aiohttp.ClientSession, up: FakeUpstream, path: str, body: Any,
               **headers: str) -> tuple[int, bytes]:
    async with http.post(up.url + path, json=body, headers=headers) as r:
        return r.status, await r.read()


# ---------------------------------------------------------------- OpenAI chat

async def test_chat_json_default_answer_and_attempt(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    status, raw = await post(http, up, "/v1/chat/completions", CHAT, authorization="Bearer sk-up")
    assert status == 200
    data = orjson.loads(raw)
    assert data["object"] == "chat.completion" and data["model"] == "gpt-4o-mini"
    choice = data["choices"][0]
    assert choice["message"]["content"] == DEFAULT_TEXT and choice["finish_reason"] == "stop"
    expected_prompt = (len("Be brief.") // 4 + 1) + (len("What is the weather in Paris?") // 4 + 1)
    assert prompt_tokens(CHAT) == expected_prompt
    assert data["usage"] == {"prompt_tokens": expected_prompt, "completion_tokens": WORDS,
                             "total_tokens": expected_prompt + WORDS}
    (att,) = up.attempts
    assert att["path"] == "/v1/chat/completions" and att["model"] == "gpt-4o-mini" and att["body"] == CHAT
    assert att["headers"]["authorization"] == "Bearer sk-up" and att["behaviour"] is None


async def test_chat_stream_without_usage(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    status, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, stream=True))
    assert status == 200
    frames = sse_data(raw)
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == DEFAULT_TEXT and len(chunks) == WORDS + 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_chat_stream_include_usage(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = dict(CHAT, stream=True, stream_options={"include_usage": True})
    async with http.post(up.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.read()
    frames = sse_data(raw)
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    *content, last = chunks
    assert all("usage" in c and c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == WORDS
    assert last["usage"]["prompt_tokens"] == prompt_tokens(CHAT)


async def test_max_tokens_truncates(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, max_tokens=2))
    data = orjson.loads(raw)
    assert data["choices"][0]["message"]["content"] == "Hello from"
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 2


async def test_tool_call_json(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, tools=TOOLS))
    choice = orjson.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "sample", "days": 1, "unit": "c"}
    named = dict(CHAT, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    _, raw = await post(http, up, "/v1/chat/completions", named)
    assert orjson.loads(raw)["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    for body in (dict(CHAT, tools=TOOLS, tool_choice="none"),
                 dict(CHAT, tools=TOOLS, messages=CHAT["messages"] + [{"role": "tool", "content": "sunny"}])):
        _, raw = await post(http, up, "/v1/chat/completions", body)
        assert orjson.loads(raw)["choices"][0]["message"]["content"] == DEFAULT_TEXT


async def test_tool_call_stream(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = dict(CHAT, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    _, raw = await post(http, up, "/v1/chat/completions", body)
    chunks = [orjson.loads(f) for f in sse_data(raw)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2]]
    first, *rest = [d["tool_calls"][0] for d in deltas]
    assert deltas[0]["role"] == "assistant"
    assert first["id"].startswith("call_") and first["type"] == "function" and first["index"] == 0
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert len(rest) > 1 and all(set(t) == {"index", "function"} and set(t["function"]) == {"arguments"} for t in rest)
    assert orjson.loads("".join(t["function"]["arguments"] for t in rest))["city"] == "sample"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == len(rest)


# ---------------------------------------------------------------- embeddings, models

async def test_embeddings_float_and_base64(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = {"model": "mock-embed", "input": ["hello world", "second"]}
    _, raw = await post(http, up, "/v1/embeddings", body)
    data = orjson.loads(raw)
    vecs = [d["embedding"] for d in data["data"]]
    assert [len(v) for v in vecs] == [8, 8] and vecs[0] != vecs[1]
    assert data["usage"] == {"prompt_tokens": (11 // 4 + 1) + (6 // 4 + 1), "total_tokens": 5}
    _, raw = await post(http, up, "/v1/embeddings", dict(body, encoding_format="base64"))
    b64 = [d["embedding"] for d in orjson.loads(raw)["data"]]
    assert [list(struct.unpack("<8f", base64.b64decode(s))) for s in b64] == vecs
    _, raw = await post(http, up, "/v1/embeddings", {"model": "e", "input": "x", "dimensions": 3})
    assert len(orjson.loads(raw)["data"][0]["embedding"]) == 3


async def test_models_openai_and_anthropic(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with http.get(up.url + "/v1/models") as r:
        data = await r.json()
    assert data["object"] == "list" and "mock-gpt" in [m["id"] for m in data["data"]]
    async with http.get(up.url + "/v1/models", headers={"anthropic-version": "2023-06-01"}) as r:
        data = await r.json()
    assert data["has_more"] is False and data["data"][0]["type"] == "model"


# ---------------------------------------------------------------- Anthropic

async def test_anthropic_json_text_and_tool(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/messages", ANTHROPIC, **{"x-api-key": "sk-ant", "anthropic-version": "2023-06-01",
                                                               "anthropic-beta": "tools-1"})
    data = orjson.loads(raw)
    assert data["type"] == "message" and data["content"] == [{"type": "text", "text": DEFAULT_TEXT}]
    assert data["stop_reason"] == "end_turn"
    assert data["usage"] == {"input_tokens": prompt_tokens(ANTHROPIC), "output_tokens": WORDS}
    assert prompt_tokens(ANTHROPIC) == (9 // 4 + 1) + (8 // 4 + 1)
    hdrs = up.attempts[0]["headers"]
    assert (hdrs["x-api-key"], hdrs["anthropic-version"], hdrs["anthropic-beta"]) == ("sk-ant", "2023-06-01", "tools-1")
    _, raw = await post(http, up, "/v1/messages", dict(ANTHROPIC, tools=A_TOOLS))
    data = orjson.loads(raw)
    assert data["stop_reason"] == "tool_use"
    (block,) = data["content"]
    assert block["type"] == "tool_use" and block["name"] == "lookup" and block["input"] == {"q": "sample"}


async def test_anthropic_stream_event_order(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/messages", dict(ANTHROPIC, stream=True))
    events = sse_events(raw)
    names = [e for e, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * WORDS + [
        "content_block_stop", "message_delta", "message_stop"]
    assert all(d["type"] == e for e, d in events)
    assert "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta") == DEFAULT_TEXT
    assert events[0][1]["message"]["usage"]["input_tokens"] == prompt_tokens(ANTHROPIC)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"] == {"output_tokens": WORDS}


async def test_anthropic_stream_tool_use(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/messages", dict(ANTHROPIC, stream=True, tools=A_TOOLS))
    events = sse_events(raw)
    assert events[1][1]["content_block"]["type"] == "tool_use" and events[1][1]["content_block"]["input"] == {}
    parts = [d["delta"] for e, d in events if e == "content_block_delta"]
    assert len(parts) > 1 and all(p["type"] == "input_json_delta" for p in parts)
    assert orjson.loads("".join(p["partial_json"] for p in parts)) == {"q": "sample"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_count_tokens(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, raw = await post(http, up, "/v1/messages/count_tokens", ANTHROPIC)
    assert orjson.loads(raw) == {"input_tokens": prompt_tokens(ANTHROPIC)}


# ---------------------------------------------------------------- behaviours

async def test_script_fifo_then_default(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(status=429, headers={"retry-after": "3"}, label="first"), Behaviour(text="second answer"))
    async with http.post(up.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 429 and r.headers["retry-after"] == "3"
        err = await r.json()
    assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "rate_limit_error"
    _, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, model="claude-mock"))
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "second answer"
    _, raw = await post(http, up, "/v1/chat/completions", CHAT)
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == DEFAULT_TEXT
    att = up.attempts
    assert [a["model"] for a in att] == ["gpt-4o-mini", "claude-mock", "gpt-4o-mini"]
    assert att[0]["behaviour"] is not None and att[0]["behaviour"]["label"] == "first"
    assert att[1]["behaviour"] is not None and att[1]["behaviour"]["text"] == "second answer"
    assert att[2]["behaviour"] is None and up.pending == 0


async def test_error_status_anthropic_format(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(status=529))
    status, raw = await post(http, up, "/v1/messages", ANTHROPIC)
    assert status == 529
    assert orjson.loads(raw) == {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "fake upstream error 529"}}


async def test_body_verbatim(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(status=400, body={"error": {"message": "context too long", "code": "context_length_exceeded"}}),
              Behaviour(body={"anything": [1, 2]}))
    for expected_status, expected in ((400, {"error": {"message": "context too long",
                                                       "code": "context_length_exceeded"}}), (200, {"anything": [1, 2]})):
        status, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, stream=True))
        assert (status, orjson.loads(raw)) == (expected_status, expected)


async def test_delay(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(delay_ms=150))
    t0 = time.perf_counter()
    status, _ = await post(http, up, "/v1/chat/completions", CHAT)
    assert status == 200 and time.perf_counter() - t0 >= 0.15


async def test_omit_usage(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(*[Behaviour(omit_usage=True)] * 4)
    _, raw = await post(http, up, "/v1/chat/completions", CHAT)
    assert "usage" not in orjson.loads(raw)
    _, raw = await post(http, up, "/v1/chat/completions", dict(CHAT, stream=True, stream_options={"include_usage": True}))
    assert b"usage" not in raw and sse_data(raw)[-1] == "[DONE]"
    _, raw = await post(http, up, "/v1/messages", dict(ANTHROPIC, stream=True))
    assert b"usage" not in raw and b"message_stop" in raw
    _, raw = await post(http, up, "/v1/embeddings", {"input": "x"})
    assert "usage" not in orjson.loads(raw)


async def test_sse_frames_verbatim(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    frames = ['data: {"weird": true}\n\n', ": comment\n\n", "data: [DONE]\n\n"]
    up.script(Behaviour(sse_frames=frames, headers={"x-extra": "1"}))
    async with http.post(up.url + "/v1/chat/completions", json=dict(CHAT, stream=True)) as r:
        assert r.headers["x-extra"] == "1" and r.headers["content-type"].startswith("text/event-stream")
        assert await r.read() == "".join(frames).encode()


async def test_cut_after_chunks(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(cut_after_chunks=2))
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(up.url + "/v1/chat/completions", json=dict(CHAT, stream=True)) as r:
            assert r.status == 200
            async for piece in r.content.iter_any():
                got += piece
    assert got.count(b"data: ") == 2 and b"[DONE]" not in got


async def test_stall_after_chunks(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(stall_after_chunks=1, sse_frames=["data: 1\n\n", "data: 2\n\n"]))
    async with http.post(up.url + "/v1/chat/completions", json=dict(CHAT, stream=True)) as r:
        assert await r.content.readuntil(b"\n\n") == b"data: 1\n\n"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.content.read(1), 0.3)


async def test_chunk_interval(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(chunk_interval_ms=40, sse_frames=["data: a\n\n", "data: b\n\n", "data: c\n\n"]))
    stamps = []
    async with http.post(up.url + "/v1/chat/completions", json=CHAT) as r:
        while line := await r.content.readuntil(b"\n\n"):
            stamps.append(time.perf_counter())
            if line == b"data: c\n\n":
                break
    assert stamps[-1] - stamps[0] >= 0.075


async def test_drop_connection(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    up.script(Behaviour(drop_connection=True))
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(http, up, "/v1/chat/completions", CHAT)
    status, _ = await post(http, up, "/v1/chat/completions", CHAT)
    assert status == 200 and len(up.attempts) == 2


async def test_behaviour_validation() -> None:
    assert Behaviour.from_json({"status": 500, "delay_ms": 5}) == Behaviour(status=500, delay_ms=5)
    bad: Any
    for bad in ({"bogus": 1}, {"status": "500"}, {"drop_connection": 1}, {"cut_after_chunks": True}, [],
                {"headers": {"retry-after": 1}}, {"sse_frames": [b"x"]}):
        with pytest.raises((ValueError, TypeError)):
            Behaviour.from_json(bad)


# ---------------------------------------------------------------- control endpoints, process mode

async def test_http_control_endpoints(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    status, raw = await post(http, up, "/__script", [{"status": 503, "label": "x"}, {"text": "ok then"}])
    assert (status, orjson.loads(raw)) == (200, {"queued": 2})
    assert (await post(http, up, "/__script", [{"nope": 1}]))[0] == 400
    assert (await post(http, up, "/v1/chat/completions", CHAT))[0] == 503
    await post(http, up, "/v1/chat/completions", CHAT)
    await post(http, up, "/v2/wrong", {})
    async with http.get(up.url + "/__attempts") as r:
        attempts = await r.json()
    assert [a["behaviour"] and a["behaviour"]["label"] for a in attempts] == ["x", None, None]
    assert attempts[2]["path"] == "/v2/wrong"
    async with http.get(up.url + "/__stats") as r:
        assert await r.json() == {"requests": 3, "pending": 0}
    assert (await post(http, up, "/__reset", {}))[0] == 200
    assert up.attempts == [] and up.stats["requests"] == 0


async def test_subprocess_mode(http: aiohttp.ClientSession) -> None:
    script = Path(__file__).with_name("fakeupstream.py")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), "--port", "0", "--delay-ms", "1",
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("READY ")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        async with http.post(url + "/__script", json=[{"status": 500}]) as r:
            assert r.status == 200
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 500
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == DEFAULT_TEXT
        async with http.get(url + "/__attempts") as r:
            assert len(await r.json()) == 2
    finally:
        if proc.returncode is None:
            proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
