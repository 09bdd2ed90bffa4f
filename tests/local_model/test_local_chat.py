"""The OpenAI and Anthropic SDKs through the gateway to a real llama.cpp server (SmolLM2-135M).

Asserts structure and usage, never the model's words: a 135M model says what it says.
"""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import anthropic
import openai
import pytest

from gateway import tokens
from tests.harness import TENANT_KEY, RunningGateway
from tests.local_model.conftest import LOCAL_ALIAS

pytestmark = pytest.mark.local_model

MAX_TOKENS = 24
ASK: Any = [{"role": "user", "content": "Name three colours."}]
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                   "required": ["city"]}}}
FORCE_WEATHER: Any = {"type": "function", "function": {"name": "get_weather"}}


def oa(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0, timeout=120)


def ledger_row(gw: RunningGateway, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The settled ledger entry of one request (the ledger flushes in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = sqlite3.connect(gw.runtime.db_path)
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT model, provider, input_tokens, output_tokens, cost_usd, usage_estimated, status"
                               " FROM ledger_entries WHERE request_id=?", (request_id,)).fetchone()
        except sqlite3.OperationalError:  # the table is created by the first flush
            row = None
        finally:
            conn.close()
        if row is not None:
            return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger entry for {request_id}")
        time.sleep(0.05)


def test_openai_chat_uses_the_local_model_and_its_usage(local_gateway: RunningGateway) -> None:
    raw = oa(local_gateway).chat.completions.with_raw_response.create(
        model="fast", max_tokens=MAX_TOKENS, messages=ASK, extra_headers={"x-request-id": "local-chat-1"})
    reply = raw.parse()
    assert (raw.headers["x-gateway-model"], raw.headers["x-gateway-provider"]) == ("llama-local", "local")
    assert raw.headers["x-gateway-route"].endswith(":fast")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == LOCAL_ALIAS
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= MAX_TOKENS
    # llama.cpp reports usage on non-streamed answers: the ledger takes it as reported.
    row = ledger_row(local_gateway, raw.headers["x-gateway-request-id"])  # the ledger key: the gateway's id
    assert row == {"model": "llama-local", "provider": "local", "input_tokens": reply.usage.prompt_tokens,
                   "output_tokens": reply.usage.completion_tokens, "cost_usd": row["cost_usd"],
                   "usage_estimated": 0, "status": "ok"}
    assert float(row["cost_usd"]) == 0


def test_openai_stream_usage_is_counted_by_the_gateway(local_gateway: RunningGateway) -> None:
    stream = oa(local_gateway).chat.completions.create(
        model="fast", max_tokens=MAX_TOKENS, messages=ASK, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": "local-stream-1"})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert len(with_choices) >= 2 and text.strip()
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] in (["stop"], ["length"])
    # llama.cpp ignores stream_options.include_usage, so the gateway counts: the prompt by its
    # estimate, the output by counting the streamed text, and marks the usage as estimated.
    row = ledger_row(local_gateway, stream.response.headers["x-gateway-request-id"])
    assert (row["model"], row["usage_estimated"], row["status"]) == ("llama-local", 1, "ok")
    assert row["input_tokens"] > 0
    assert row["output_tokens"] == tokens.count_text(text) > 0


def test_forced_tool_call(local_gateway: RunningGateway) -> None:
    reply = oa(local_gateway).chat.completions.create(
        model="fast", max_tokens=40, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "London")


def test_forced_tool_call_streamed(local_gateway: RunningGateway) -> None:
    stream = oa(local_gateway).chat.completions.create(
        model="fast", max_tokens=40, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, stream=True,
        messages=[{"role": "user", "content": "What is the weather in London?"}])
    names, ids, arguments, finish = set(), set(), [], []
    for chunk in stream:
        for choice in chunk.choices:
            finish += [choice.finish_reason] if choice.finish_reason else []
            for call in choice.delta.tool_calls or ():
                assert call.index == 0
                ids |= {call.id} if call.id else set()
                if call.function and call.function.name:
                    names.add(call.function.name)
                if call.function and call.function.arguments:
                    arguments.append(call.function.arguments)
    # llama-cpp-python repeats the id and the name in every tool-call delta (OpenAI sends them
    # once): one call, one name, whichever form reaches the client.
    assert names == {"get_weather"} and len(ids) == 1
    assert json.loads("".join(arguments))["city"] in ("Paris", "London")
    assert finish == ["tool_calls"]


def test_anthropic_sdk_message_and_stream(local_gateway: RunningGateway) -> None:
    claude = anthropic.Anthropic(base_url=local_gateway.url, api_key=TENANT_KEY, max_retries=0, timeout=120)
    raw = claude.messages.with_raw_response.create(model="fast", max_tokens=MAX_TOKENS, messages=ASK)
    message = raw.parse()
    assert raw.headers["x-gateway-model"] == "llama-local"
    assert message.role == "assistant" and message.type == "message"
    assert message.content and message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= MAX_TOKENS

    with claude.messages.stream(model="fast", max_tokens=MAX_TOKENS, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0
