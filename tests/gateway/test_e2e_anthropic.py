"""The real `anthropic` and `openai` SDKs against a real gateway, with a real fake upstream
speaking both formats: every client format with every provider format, on 127.0.0.1."""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway.test_e2e_openai import audit_rows, wait_for
from tests.harness import (
    DEFAULT_POLICY,
    OTHER_KEY,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
)

UPSTREAM_KEY = "sk-upstream-secret-test"
GOLDEN = Path(__file__).resolve().parent.parent / "adapters" / "golden"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OA_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": WEATHER["input_schema"]}}
POLICY = {**DEFAULT_POLICY, "routes": [
    {"name": "claude-first", "when": {"model": "claude-first"}, "candidates": ["claude-a", "mock-a"],
     "objective": "ordered"},
    {"name": "gpt-first", "when": {"model": "gpt-first"}, "candidates": ["mock-a", "claude-a"], "objective": "ordered"},
    *DEFAULT_POLICY["routes"]]}


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> RunningGateway:
    gw_config["providers"].append({"name": "anthro", "type": "anthropic", "base_url": upstream.url,
                                   "api_key_env": "TEST_UPSTREAM_KEY", "timeout_s": 10})
    gw_config["models"].append({
        "name": "claude-a", "provider": "anthro", "upstream_model": "claude-mock", "input_usd_per_mtok": 3,
        "output_usd_per_mtok": 15, "cached_input_usd_per_mtok": "0.3", "cache_write_usd_per_mtok": "3.75",
        "max_output_tokens": 512, "quality": 3, "capabilities": ["chat", "tools", "json", "vision"]})
    return start_gateway(policies=[POLICY])


def ac(gw: RunningGateway, key: str = TENANT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def oc(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)


def ledger(gw: RunningGateway) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(gw.runtime.db_path)
    try:
        return conn.execute("SELECT model, input_tokens, output_tokens, cached_input_tokens, cost_usd, usage_estimated "
                            "FROM ledger_entries").fetchall()
    finally:
        conn.close()


def golden_frames(direction: str, case: str) -> list[str]:
    golden = json.loads((GOLDEN / direction / f"{case}.json").read_text())
    return [frame + "\n\n" for frame in golden["stream_in"]]


def sse_events(gw: RunningGateway, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, timeout=10,
                      headers={"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = []
    for frame in raw.split("\n\n"):
        if frame.strip():
            name, data = frame.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), frame
            events.append((name[7:], json.loads(data[6:])))
    return events


def assert_anthropic_order(names: list[str]) -> None:
    """message_start, (content_block_start, content_block_delta*, content_block_stop)*, message_delta, message_stop."""
    names = [n for n in names if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    open_block = False
    for name in names[1:-2]:
        if name == "content_block_start":
            assert not open_block
            open_block = True
        elif name == "content_block_delta":
            assert open_block
        else:
            assert name == "content_block_stop" and open_block
            open_block = False
    assert not open_block


# ------------------------------------------------------------------ Anthropic client -> Anthropic provider
def test_pass_through_forwards_the_body_unchanged_apart_from_the_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    raw = ac(gw).messages.with_raw_response.create(
        model="claude-a", max_tokens=100, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "u-1"}, extra_body={"top_k": 3},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    message = raw.parse()
    assert message.content[0].type == "text" and message.content[0].text.startswith("Hello")
    assert raw.headers["x-gateway-model"] == "claude-a" and raw.headers["x-gateway-provider"] == "anthro"
    sent = upstream.attempts()[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["body"] == {"max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], "model": "claude-mock",
                            "metadata": {"user_id": "u-1"},
                            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                            "top_k": 3}
    headers = sent["headers"]
    assert (headers["x-api-key"], headers["anthropic-version"], headers["anthropic-beta"]) == (
        UPSTREAM_KEY, "2023-06-01", "prompt-caching-2024-07-31")
    assert TENANT_KEY not in json.dumps(headers)  # the tenant key never goes upstream
    row = wait_for(lambda: ledger(gw))[0]
    assert row[:4] == ("claude-a", message.usage.input_tokens, message.usage.output_tokens, 0)
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["api"] == "anthropic" and record["usage_raw"] == message.usage.model_dump(exclude_none=True)


def test_pass_through_stream_order_and_sdk_accumulation(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    body = {"model": "claude-a", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = sse_events(gw, body)
    assert_anthropic_order([name for name, _ in events])
    final_usage = events[-2][1]["usage"]
    with ac(gw).messages.stream(model="claude-a", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
        message = stream.get_final_message()
    assert message.content[0].text.startswith("Hello") and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == final_usage["output_tokens"]
    rows = wait_for(lambda: len(ledger(gw)) == 2 and ledger(gw))
    assert [r[2] for r in rows] == [final_usage["output_tokens"]] * 2 and all(r[5] == 0 for r in rows)


def test_cache_usage_is_normalised_and_priced(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    usage = {"input_tokens": 100, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 50}
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-mock", "stop_reason": "end_turn",
              "stop_sequence": None, "content": [{"type": "text", "text": "cached"}], "usage": usage}
    upstream.script({"body": answer}, {"body": answer})
    message = ac(gw).messages.create(model="claude-a", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert message.usage.cache_read_input_tokens == 1000  # the client sees Anthropic's own numbers
    completion = oc(gw).chat.completions.create(model="claude-a", messages=[{"role": "user", "content": "hi"}])
    assert completion.usage is not None and completion.usage.prompt_tokens == 1300  # OpenAI's includes cached
    assert completion.usage.prompt_tokens_details is not None and completion.usage.prompt_tokens_details.cached_tokens == 1000
    expected = (Decimal(100) * 3 + Decimal(50) * 15 + Decimal(1000) * Decimal("0.3") + Decimal(200) * Decimal("3.75")) / 10**6
    rows = wait_for(lambda: len(ledger(gw)) == 2 and ledger(gw))
    for row in rows:  # normalised: input excludes cache reads (and includes writes), cached = reads
        assert row[:4] == ("claude-a", 300, 50, 1000) and Decimal(row[4]) == expected
    records = wait_for(lambda: len(audit_rows(gw)) == 2 and audit_rows(gw))
    assert all(r["usage_raw"] == usage and r["cache_write_tokens"] == 200 for r in records)


def test_ledger_keeps_cache_writes_raw_usage_and_the_rates_charged(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    usage = {"input_tokens": 100, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000,
             "output_tokens": 50, "cache_creation": {"ephemeral_5m_input_tokens": 200}, "service_tier": "standard"}
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-mock", "stop_reason": "end_turn",
              "stop_sequence": None, "content": [{"type": "text", "text": "cached"}], "usage": usage}
    upstream.script({"body": answer})
    raw = ac(gw).messages.with_raw_response.create(model="claude-a", max_tokens=100,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().usage.cache_creation_input_tokens == 200
    request_id = raw.headers["x-request-id"]

    def row() -> tuple[Any, ...] | None:
        conn = sqlite3.connect(gw.runtime.db_path)
        try:
            return conn.execute(
                "SELECT l.input_tokens, l.cached_input_tokens, l.cache_write_tokens, l.output_tokens, l.usage_raw,"
                " l.cost_usd, p.model, p.input_usd_per_mtok, p.output_usd_per_mtok, p.cached_input_usd_per_mtok,"
                " p.cache_write_usd_per_mtok FROM ledger_entries l JOIN price_versions p"
                " ON p.version = l.price_version WHERE l.request_id = ?", (request_id,)).fetchone()
        finally:
            conn.close()

    got = wait_for(row)
    assert got[:4] == (300, 1000, 200, 50)  # normalised input includes the 200 written to the cache
    numbers = {k: v for k, v in usage.items() if k != "service_tier"}  # the ledger keeps usage numbers only
    assert json.loads(got[4]) == numbers
    assert got[6:] == ("claude-a", "3", "15", "0.3", "3.75")  # the rates behind the row's price version
    rates = [Decimal(r) for r in got[7:]]
    repriced = (100 * rates[0] + 50 * rates[1] + 1000 * rates[2] + 200 * rates[3]) / 10**6
    assert Decimal(got[5]) == repriced


# ------------------------------------------------------------------ Anthropic client -> OpenAI-type provider
def test_anthropic_sdk_through_openai_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    message = ac(gw).messages.create(model="mock-a", max_tokens=100, system="Be brief.", extra_body={"temperature": 0.5},
                                     stop_sequences=["END"], messages=[{"role": "user", "content": "hi"}])
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    assert message.content[0].text.startswith("Hello") and message.usage.output_tokens > 0
    sent = upstream.attempts()[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "up-a"
    assert sent["body"]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (sent["body"]["stop"], sent["body"]["max_tokens"], sent["body"]["temperature"]) == (["END"], 100, 0.5)
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_anthropic_stream_from_openai_upstream(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    events = sse_events(gw, {"model": "mock-a", "max_tokens": 100, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert_anthropic_order([name for name, _ in events])
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"]["output_tokens"] > 0
    assert upstream.attempts()[-1]["body"]["stream_options"] == {"include_usage": True}
    with ac(gw).messages.stream(model="mock-a", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text.startswith("Hello") and message.content[0].text == text


def test_anthropic_tool_use_loop_through_openai_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    client = ac(gw)
    question = {"role": "user", "content": "Weather in Paris?"}
    first = client.messages.create(model="mock-a", max_tokens=200, tools=[WEATHER], messages=[question])
    call = first.content[0]
    assert first.stop_reason == "tool_use" and call.type == "tool_use"
    assert call.name == "get_weather" and call.input == {"city": "sample"}
    with client.messages.stream(model="mock-a", max_tokens=200, tools=[WEATHER], messages=[question]) as stream:
        streamed = stream.get_final_message()  # the SDK assembles the partial JSON itself
    assert streamed.content[0].type == "tool_use" and streamed.content[0].input == {"city": "sample"}
    final = client.messages.create(model="mock-a", max_tokens=200, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C, sunny"}]}])
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    sent = upstream.attempts()[-1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}


def test_streamed_parallel_tool_calls_from_openai_upstream_for_the_anthropic_sdk(
        gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"sse_frames": golden_frames("anthropic_client__openai_upstream", "tools_streamed")})
    long_name = "mcp__acme_internal_knowledge_base__search_documents_by_semantic_similarity"
    tools = [WEATHER, {"name": long_name, "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    with ac(gw).messages.stream(model="mock-a", max_tokens=200, tools=tools,
                                messages=[{"role": "user", "content": "go"}]) as stream:
        message = stream.get_final_message()
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        ("get_weather", {"city": "Paris"}), (long_name, {"q": "rain"})]
    sent_names = [t["function"]["name"] for t in upstream.attempts()[-1]["body"]["tools"]]
    assert sent_names[0] == "get_weather" and len(sent_names[1]) <= 64 and sent_names[1] != long_name


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cut_off_through_openai_model(gw: RunningGateway, stream: bool) -> None:
    client = ac(gw)
    kwargs: dict[str, Any] = {"model": "mock-a", "max_tokens": 3, "messages": [{"role": "user", "content": "long"}]}
    if stream:
        with client.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "max_tokens" and len(message.content[0].text.split()) == 3


def test_refusal_from_openai_model_is_an_anthropic_refusal(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"body": {"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "up-a", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}})
    message = ac(gw).messages.create(model="mock-a", max_tokens=50, messages=[{"role": "user", "content": "x"}])
    assert message.stop_reason == "refusal" and message.content[0].text == "I can't help with that."


# ------------------------------------------------------------------ OpenAI client -> Anthropic provider
def test_openai_sdk_through_anthropic_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    client = oc(gw)
    completion = client.chat.completions.create(model="claude-a", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content.startswith("Hello")  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None
    sent = upstream.attempts()[-1]
    assert sent["path"] == "/v1/messages" and sent["model"] == "claude-mock"
    assert sent["body"]["max_tokens"] == 512  # the model's max_output_tokens: Anthropic requires one
    assert sent["body"]["system"] == "Be brief." and sent["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent["headers"]
    chunks = list(client.chat.completions.create(model="claude-a", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Hello")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    rows = wait_for(lambda: len(ledger(gw)) == 2 and ledger(gw))
    assert all(r[0] == "claude-a" and r[2] > 0 and r[5] == 0 for r in rows)


def test_openai_parallel_tool_calls_from_anthropic_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    answer = json.loads((GOLDEN / "openai_client__anthropic_upstream" / "tools.json").read_text())["response_in"]
    upstream.script({"body": answer}, {"sse_frames": golden_frames("openai_client__anthropic_upstream", "tools_streamed")})
    client = oc(gw)
    tools = [OA_WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris and the time in Tokyo?"}]
    completion = client.chat.completions.create(model="claude-a", messages=messages, tools=tools, parallel_tool_calls=False)
    calls = completion.choices[0].message.tool_calls or []
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_01P", "get_weather", {"city": "Paris"}), ("toolu_01T", "get_time", {"tz": "Asia/Tokyo"})]
    assert upstream.attempts()[-1]["body"]["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    with client.chat.completions.stream(model="claude-a", messages=messages, tools=tools) as stream:
        final = stream.get_final_completion()  # the SDK's own accumulator over the translated stream
    streamed = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
        ("toolu_01P", "get_weather", {"city": "Paris"}), ("toolu_01T", "get_time", {"tz": "Asia/Tokyo"})]


def test_openai_tool_results_reach_anthropic_as_one_user_turn(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    calls = [{"id": f"call_{c}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
             for c in ("Paris", "Rome")]
    completion = oc(gw).chat.completions.create(model="claude-a", tools=[OA_WEATHER], messages=[
        {"role": "user", "content": "Paris and Rome?"}, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_Rome", "content": "22C"}])
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "stop"
    sent = upstream.attempts()[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert [b["type"] for b in sent[1]["content"]] == ["tool_use", "tool_use"]
    assert sent[2]["content"] == [{"type": "tool_result", "tool_use_id": "call_Paris", "content": "18C"},
                                  {"type": "tool_result", "tool_use_id": "call_Rome", "content": "22C"}]


def test_openai_stream_from_anthropic_ends_with_done_and_counts_usage(gw: RunningGateway) -> None:
    with httpx.stream("POST", f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10,
                      json={"model": "claude-a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert not any('"usage":{' in line for line in lines)  # not asked for: not sent (still billed exactly)
    assert wait_for(lambda: ledger(gw))[0][5] == 0


# ------------------------------------------------------------------ count_tokens
def test_count_tokens_is_exact_from_anthropic_provider(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    raw = ac(gw).messages.with_raw_response.count_tokens(model="claude-a", system="Be brief.", tools=[WEATHER],
                                                         messages=[{"role": "user", "content": "hello there"}])
    assert raw.headers["x-gateway-token-count"] == "exact" and raw.headers["x-gateway-model"] == "claude-a"
    sent = upstream.attempts()[-1]
    assert sent["path"] == "/v1/messages/count_tokens" and sent["model"] == "claude-mock"
    assert sent["body"]["tools"] == [WEATHER] and sent["body"]["system"] == "Be brief."
    assert raw.parse().input_tokens == 3 + 3  # the fake's count: (len(system)//4 + 1) + (len(text)//4 + 1)


def test_count_tokens_offline_includes_system_and_tools(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    client = ac(gw)
    messages: list[Any] = [{"role": "user", "content": "hello there"}]
    bare = client.messages.with_raw_response.count_tokens(model="mock-a", messages=messages)
    full = client.messages.count_tokens(model="mock-a", messages=messages, system="You are a very careful assistant.",
                                        tools=[WEATHER])
    assert bare.headers["x-gateway-token-count"] == "estimated"
    assert full.input_tokens > bare.parse().input_tokens + 30  # the tool schema and system prompt are counted
    assert upstream.attempts() == []  # offline: no upstream call


def test_count_tokens_falls_back_to_offline_when_the_provider_is_down(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 529})
    raw = ac(gw).messages.with_raw_response.count_tokens(model="claude-a", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-token-count"] == "estimated" and raw.parse().input_tokens > 0


# ------------------------------------------------------------------ errors and auth on Anthropic routes
HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "key", "status", "kind"), [
    ({"model": "claude-a", "messages": HI}, TENANT_KEY, 400, "invalid_request_error"),  # max_tokens is required
    ({"model": "mock-a", "messages": HI}, TENANT_KEY, 400, "invalid_request_error"),  # whatever the provider type
    ({"model": "claude-a", "max_tokens": 10, "messages": "hi"}, TENANT_KEY, 400, "invalid_request_error"),
    ({"model": "claude-a", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, TENANT_KEY, 400,
     "invalid_request_error"),
    ({"model": "claude-a", "max_tokens": 10, "messages": HI}, "gw-wrong", 401, "authentication_error"),
    ({"model": "claude-a", "max_tokens": 10, "messages": HI}, OTHER_KEY, 403, "permission_error"),
    ({"model": "nope", "max_tokens": 10, "messages": HI}, TENANT_KEY, 404, "not_found_error"),
])
def test_errors_use_the_anthropic_envelope(gw: RunningGateway, upstream: UpstreamProcess, body: dict[str, Any],
                                           key: str, status: int, kind: str) -> None:
    resp = httpx.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": key})
    assert resp.status_code == status
    assert resp.json() == {"type": "error", "error": {"type": kind, "message": resp.json()["error"]["message"]}}
    assert upstream.attempts() == []


@pytest.mark.parametrize(("model", "key", "error"), [
    ("claude-a", "gw-wrong", anthropic.AuthenticationError),
    ("claude-a", OTHER_KEY, anthropic.PermissionDeniedError),
    ("nope", TENANT_KEY, anthropic.NotFoundError),
])
def test_sdk_raises_its_own_error_types(gw: RunningGateway, model: str, key: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        ac(gw, key).messages.create(model=model, max_tokens=10, messages=HI)


def test_malformed_json_and_count_tokens_errors_are_anthropic_shaped(gw: RunningGateway) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        resp = httpx.post(f"{gw.url}{path}", content=b"{nope", headers={"x-api-key": TENANT_KEY})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(f"{gw.url}/v1/messages/count_tokens", json={"model": "x", "messages": []})
    assert resp.status_code == 401 and resp.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": resp.json()["error"]["message"]}}


def test_rate_limit_is_a_rate_limit_error(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["tenants"][0]["rate_limits"] = {"requests_per_minute": 1}
    gw = start_gateway()
    client = ac(gw)
    client.messages.create(model="mock-a", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="mock-a", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


@pytest.mark.parametrize("headers", [
    {"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"},
    {"authorization": f"Bearer {TENANT_KEY}", "anthropic-version": "2099-12-31"},
    {"authorization": f"Bearer {TENANT_KEY}"},
])
def test_auth_headers_and_any_anthropic_version(gw: RunningGateway, upstream: UpstreamProcess,
                                                headers: dict[str, str]) -> None:
    resp = httpx.post(f"{gw.url}/v1/messages", headers=headers, json={
        "model": "claude-a", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200 and resp.json()["type"] == "message"
    assert upstream.attempts()[-1]["headers"]["anthropic-version"] == "2023-06-01"


def test_overloaded_anthropic_falls_over_to_an_openai_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 529}, {"status": 529})
    raw = ac(gw).messages.with_raw_response.create(model="claude-first", max_tokens=50,
                                                   messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-a" and raw.headers["x-gateway-attempts"] == "3"
    assert raw.parse().content[0].text.startswith("Hello")
    assert [a["path"] for a in upstream.attempts()] == ["/v1/messages", "/v1/messages", "/v1/chat/completions"]


def test_every_candidate_failing_is_an_api_error(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 529}] * 4)
    with pytest.raises(anthropic.APIStatusError) as info:
        ac(gw).messages.create(model="claude-first", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502 and info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "fake upstream" not in str(info.value.body)  # never the upstream's text


# ------------------------------------------------------------------ errors mid-stream
@pytest.mark.parametrize("model", ["claude-a", "mock-a"])
def test_upstream_cut_mid_stream_is_an_error_event(gw: RunningGateway, upstream: UpstreamProcess, model: str) -> None:
    # Cut after content reached the client (a cut inside the preamble fails over invisibly: test_faults_streams).
    upstream.script({"cut_after_chunks": 5, "text": "a b c d e f g h i j"})
    with pytest.raises(anthropic.APIStatusError) as info, ac(gw).messages.stream(
            model=model, max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        stream.get_final_message()
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "stream_interrupted"


def test_anthropic_error_event_reaches_an_openai_client(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    # Frames apart, so content reaches the client before the error (before it: an invisible failover).
    upstream.script({"sse_frames": golden_frames("openai_client__anthropic_upstream", "stream_error"),
                     "chunk_interval_ms": 20})
    stream = oc(gw).chat.completions.create(model="claude-a", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "Overloaded" not in str(info.value)  # fixed text, never the upstream's
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "stream_interrupted"


# ------------------------------------------------------------------ what only one format can express
def test_anthropic_only_features_skip_candidates_that_cannot_express_them(gw: RunningGateway,
                                                                          upstream: UpstreamProcess) -> None:
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    body = {"max_tokens": 50, "tools": [server_tool], "messages": HI}
    resp = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": TENANT_KEY}, json={"model": "mock-a", **body})
    assert resp.status_code == 400 and "web_search_20250305" in resp.json()["error"]["message"]
    assert upstream.attempts() == []
    resp = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": TENANT_KEY}, json={"model": "gpt-first", **body})
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "claude-a"
    assert upstream.attempts()[-1]["body"]["tools"] == [server_tool]


def test_models_list_for_the_anthropic_sdk(gw: RunningGateway) -> None:
    ids = [m.id for m in ac(gw).models.list()]
    assert {"claude-a", "mock-a", "claude-first"} <= set(ids)
    assert [m.id for m in ac(gw, OTHER_KEY).models.list()] == ["mock-a"]
    with pytest.raises(anthropic.AuthenticationError):
        ac(gw, "gw-wrong").models.list()


@pytest.mark.parametrize(("model", "path", "body"), [
    ("claude-a", "/v1/chat/completions", {"messages": HI}),
    ("mock-a", "/v1/messages", {"max_tokens": 10, "messages": HI}),
])
def test_unreadable_answer_across_formats_is_a_502_and_still_settled(
        gw: RunningGateway, upstream: UpstreamProcess, model: str, path: str, body: dict[str, Any]) -> None:
    upstream.script({"body": "not a message"})
    resp = httpx.post(f"{gw.url}{path}", headers={"x-api-key": TENANT_KEY}, json={"model": model, **body})
    assert resp.status_code == 502 and "not a message" not in resp.text
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["status"] == 502 and record["error_code"] == "upstream_error"
    assert gw.runtime.in_flight == 0
