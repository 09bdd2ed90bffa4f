"""The real `openai` SDK against a real gateway and a real fake upstream, all on 127.0.0.1."""
from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.harness import OTHER_KEY, TENANT_KEY, RunningGateway, UpstreamProcess

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def client(gw: RunningGateway, key: str = TENANT_KEY, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=kw.pop("max_retries", 0), **kw)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def audit_rows(gw: RunningGateway) -> list[dict[str, Any]]:
    from gateway.audit import read_audit

    return read_audit(gw.runtime.db_path)


def ledger_rows(gw: RunningGateway) -> list[tuple[Any, ...]]:
    import sqlite3

    conn = sqlite3.connect(gw.runtime.db_path)
    try:
        return conn.execute(
            "SELECT request_id, model, input_tokens, output_tokens, cost_usd, usage_estimated FROM ledger_entries"
        ).fetchall()
    finally:
        conn.close()


def test_chat_non_stream(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="mock-a", messages=[{"role": "user", "content": "Say hello"}])
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    headers = raw.headers
    assert headers["x-gateway-model"] == "mock-a"
    assert headers["x-gateway-provider"] == "primary"
    assert headers["x-gateway-route"].startswith("default@") and headers["x-gateway-route"].endswith(":direct")
    assert headers["x-gateway-attempts"] == "1"
    assert float(headers["x-gateway-overhead-ms"]) >= 0
    assert headers["x-request-id"].startswith("req_")
    assert "x-ratelimit-remaining-requests" in headers
    sent = upstream.attempts()[-1]
    assert sent["model"] == "up-a"
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret-test"
    assert sent["body"]["max_tokens"] == 256  # the model's cap, so the budget bound holds
    rows = wait_for(lambda: ledger_rows(gateway))
    assert rows[0][1] == "mock-a" and rows[0][2] == completion.usage.prompt_tokens
    assert rows[0][3] == completion.usage.completion_tokens
    expected = (Decimal(rows[0][2]) * 1 + Decimal(rows[0][3]) * 2) / Decimal(1_000_000)
    assert Decimal(rows[0][4]) == expected
    record = wait_for(lambda: audit_rows(gateway))[0]
    assert record["tenant"] == "team" and record["model_served"] == "mock-a" and record["status"] == 200
    assert record["key_id"].startswith("cfg-") and record["attempts"][0]["outcome"] == "ok"


def test_client_request_id_is_echoed(gateway: RunningGateway) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="mock-a", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "abc-123"})
    assert raw.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream(gateway: RunningGateway, upstream: UpstreamProcess, include_usage: bool) -> None:
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client(gateway).chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "Stream please"}], stream=True, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if include_usage else 0)
    # The gateway always asks upstream for usage, so the ledger is exact either way.
    assert upstream.attempts()[-1]["body"]["stream_options"] == {"include_usage": True}
    rows = wait_for(lambda: ledger_rows(gateway))
    assert rows[0][3] > 0 and rows[0][5] == 0
    if include_usage:
        assert rows[0][3] == usage_chunks[0].usage.completion_tokens


def test_stream_without_upstream_usage_is_counted(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"omit_usage": True, "text": "one two three four five"})
    stream = client(gateway).chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "count"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    # The client asked for usage: it gets the gateway's own count, like the ledger.
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens > 0
    rows = wait_for(lambda: ledger_rows(gateway))
    assert rows[0][3] == usage[0].completion_tokens
    assert rows[0][5] == 1 and rows[0][2] > 0 and rows[0][3] > 0
    assert wait_for(lambda: audit_rows(gateway))[0]["usage_estimated"] is True


def test_tools_non_stream_and_stream(gateway: RunningGateway) -> None:
    c = client(gateway)
    completion = c.chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and "city" in call.function.arguments
    with c.chat.completions.stream(
        model="mock-a", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
    ) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert streamed.function.name == "get_weather" and "city" in streamed.function.arguments


@pytest.mark.parametrize("encoding", ["float", None])
def test_embeddings(gateway: RunningGateway, upstream: UpstreamProcess, encoding: str | None) -> None:
    kwargs = {"encoding_format": encoding} if encoding else {}
    result = client(gateway).embeddings.create(model="mock-embed", input=["hello", "world"], **kwargs)
    assert len(result.data) == 2 and all(isinstance(x, float) for x in result.data[0].embedding)
    assert len(result.data[0].embedding) == 8
    sent = upstream.attempts()[-1]["body"]
    assert sent["model"] == "up-embed"
    assert sent.get("encoding_format") == (encoding or "base64")


def test_embeddings_base64_bytes_pass_through(gateway: RunningGateway) -> None:
    resp = httpx.post(f"{gateway.v1}/embeddings", headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": "mock-embed", "input": "hi", "encoding_format": "base64"})
    vector = base64.b64decode(resp.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(vector) // 4}f", vector)) == 8


def test_models_list_is_per_tenant(gateway: RunningGateway) -> None:
    everything = {m.id for m in client(gateway).models.list()}
    assert {"mock-a", "mock-b", "mock-embed", "fast", "cheap", "flaky"} <= everything
    narrow = {m.id for m in client(gateway, OTHER_KEY).models.list()}
    assert narrow == {"mock-a"}


def test_fallback_after_500(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 500, "body": {"error": {"message": "boom"}}},
                    {"status": 500, "body": {"error": {"message": "boom"}}})
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-b"
    assert raw.headers["x-gateway-attempts"] == "3"
    assert [a["model"] for a in upstream.attempts()] == ["up-a", "up-a", "up-b"]
    record = wait_for(lambda: audit_rows(gateway))[0]
    assert [a["outcome"] for a in record["attempts"]] == ["error", "error", "ok"]


def test_fallback_after_connect_error(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-a"
    assert [a["model"] for a in upstream.attempts()] == ["up-a"]
    record = wait_for(lambda: audit_rows(gateway))[0]
    assert [a["error"] for a in record["attempts"]][:2] == ["connect", "connect"]


def test_all_candidates_fail_gives_502_without_sdk_retries(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 503, "body": {"error": {"message": "down"}}}] * 20)
    with pytest.raises(openai.APIStatusError) as info:
        client(gateway, max_retries=2).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.body["code"] == "upstream_error"
    assert len(upstream.attempts()) == 3  # the SDK did not multiply the gateway's attempts


def test_no_retry_after_first_streamed_byte(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"cut_after_chunks": 2, "text": "a b c d e f g h i j"})
    stream = client(gateway).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert len(upstream.attempts()) == 1
    assert wait_for(lambda: audit_rows(gateway))[0]["outcome"] == "stream_interrupted"


def test_upstream_400_is_returned_not_retried(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 400, "body": {"error": {"message": "secret prompt echo", "code": "bad_thing"}}})
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert "secret prompt echo" not in str(info.value.body)
    assert len(upstream.attempts()) == 1


def test_budget_exhausted(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
                          upstream: UpstreamProcess) -> None:
    # Worst case of one request: ~20 input tokens + 256 output tokens at $1/$2 per Mtok < $0.0006.
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_usd": "0.0006"}]
    gw = start_gateway()
    c = client(gw)
    c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    wait_for(lambda: ledger_rows(gw))
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(5):
            c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "budget_exceeded"
    assert info.value.response.headers["x-should-retry"] == "false"
    spent = sum(Decimal(r[4]) for r in ledger_rows(gw))
    assert spent <= Decimal("0.0006")


def test_rate_limit(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["tenants"][0]["rate_limits"] = {"requests_per_minute": 2}
    gw = start_gateway()
    c = client(gw)
    for _ in range(2):
        c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer gw-wrong"}, {"x-api-key": "nope"}])
def test_bad_key(gateway: RunningGateway, headers: dict[str, str]) -> None:
    resp = httpx.post(f"{gateway.v1}/chat/completions", headers=headers,
                      json={"model": "mock-a", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_x_api_key_header_works(gateway: RunningGateway) -> None:
    resp = httpx.post(f"{gateway.v1}/chat/completions", headers={"x-api-key": TENANT_KEY},
                      json={"model": "mock-a", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_request"),
    (b"[1, 2]", 400, "invalid_request"),
    (b'{"model": 5, "messages": []}', 400, "invalid_request"),
    (b'{"model": "mock-a", "messages": "hi"}', 400, "invalid_request"),
    (b'{"model": "mock-a", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "invalid_request"),
    (b'{"model": "mock-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400, "invalid_request"),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
])
def test_bad_requests(gateway: RunningGateway, body: bytes, status: int, code: str) -> None:
    resp = httpx.post(f"{gateway.v1}/chat/completions", content=body,
                      headers={"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"})
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


def test_model_not_allowed(gateway: RunningGateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(gateway, OTHER_KEY).chat.completions.create(
            model="mock-b", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_allowed"


def test_body_too_large(start_gateway: Callable[..., RunningGateway], gw_config: dict[str, Any]) -> None:
    gw_config["server"] = {"max_body_bytes": 2048}
    gw = start_gateway()
    resp = httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": "mock-a", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_ops_endpoints(gateway: RunningGateway) -> None:
    client(gateway).chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["policies"] == ["default"]
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'gateway_requests_total{model="mock-a",status="2xx",tenant="team"} 1.0' in metrics
    assert "gateway_overhead_seconds_bucket" in metrics
    assert "req_" not in metrics  # no per-request labels


def test_client_disconnect_mid_stream_settles(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": " ".join(f"w{i}" for i in range(200)), "chunk_interval_ms": 20})
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", f"{gateway.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
        json={"model": "mock-a", "messages": [{"role": "user", "content": "long"}], "stream": True},
    ) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    record = wait_for(lambda: audit_rows(gateway))[0]
    assert record["outcome"] == "client_disconnected"
    rows = wait_for(lambda: ledger_rows(gateway))
    assert 0 < rows[0][3] < 200  # what was produced before the client left, counted by the gateway
    assert rows[0][5] == 1
    assert gateway.runtime.in_flight == 0


@pytest.mark.parametrize(("allowed", "asked", "served", "status"), [
    (["fast"], "fast", "mock-a", 200),       # an allowed alias allows what it routes to
    (["mock-b"], "fast", "mock-b", 200),     # alias not allowed: only allowed candidates stay
    (["mock-a"], "mock-b", None, 403),       # a model outside the list is refused
])
def test_allow_list_applies_to_dispatched_models(
    gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess,
    allowed: list[str], asked: str, served: str | None, status: int,
) -> None:
    gw_config["tenants"][1]["allowed_models"] = allowed
    gw = start_gateway()
    resp = httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {OTHER_KEY}"},
                      json={"model": asked, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == status
    if served:
        assert resp.headers["x-gateway-model"] == served
    else:
        assert resp.json()["error"]["code"] == "model_not_allowed"
