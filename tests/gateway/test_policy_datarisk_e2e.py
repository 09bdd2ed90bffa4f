"""The content scan reads tool traffic too, end to end through the real SDKs: a secret that only
appears in a tool call's arguments (or a tool definition) keeps the request on the local model."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.test_e2e_openai import audit_rows, client, wait_for
from tests.gateway.test_policy_e2e import SENSITIVE_LOCAL, policy
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess

DSN = "postgres://admin:hunter2@10.0.0.5/db"
TOOL = {"type": "function", "function": {"name": "run_sql", "description": "Run a SQL query",
                                         "parameters": {"type": "object", "properties": {"dsn": {"type": "string"}}}}}


def record_for(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    return wait_for(lambda: next((r for r in audit_rows(gw) if r.get("request_id") == request_id), None))  # type: ignore[no-any-return]


def test_secret_only_in_a_tool_call_argument_lands_on_the_local_model(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start_gateway([policy(SENSITIVE_LOCAL)])
    c = client(gw)

    def turn(arguments: str) -> list[ChatCompletionMessageParam]:
        return [{"role": "user", "content": "how many users signed up today?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "run_sql", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]

    clean = c.chat.completions.with_raw_response.create(
        model="mock-b", tools=[TOOL], messages=turn('{"dsn": "postgres://warehouse.internal/app"}'))
    assert clean.headers["x-gateway-model"] == "mock-b"
    raw = c.chat.completions.with_raw_response.create(
        model="mock-b", tools=[TOOL], messages=turn(json.dumps({"dsn": DSN, "sql": "select count(*) from users"})))
    assert raw.parse().choices[0].message is not None
    assert raw.headers["x-gateway-model"] == "mock-a"
    assert raw.headers["x-gateway-route"].endswith(":sensitive-stays-local")
    assert [a["model"] for a in upstream.attempts()] == ["up-b", "up-a"]  # the password never went to a vendor
    record = record_for(gw, raw.headers["x-request-id"])
    assert record["data_class"] == "confidential" and record["model_served"] == "mock-a"
    assert record["features"]["sensitive_findings"] == ["URL_PASSWORD"]
    assert record["features"]["data_class_raised_by"] == ["scan"]
    assert "hunter2" not in json.dumps(audit_rows(gw))


def test_secret_in_anthropic_tool_use_input_or_a_tool_description_stays_local(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start_gateway([policy(SENSITIVE_LOCAL)])
    claude = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    tool = {"name": "run_sql", "description": "Run a SQL query", "input_schema": {"type": "object"}}
    history: list[Any] = [
        {"role": "user", "content": "count the users"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "run_sql",
                                           "input": {"dsn": DSN}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]
    first = claude.messages.with_raw_response.create(model="mock-b", max_tokens=20, tools=[tool], messages=history)
    described = {**tool, "description": "Run a SQL query against https://bob:pw@localhost:8443/sql"}
    second = claude.messages.with_raw_response.create(model="mock-b", max_tokens=20, tools=[described],
                                                      messages=[{"role": "user", "content": "count the users"}])
    for raw in (first, second):
        assert raw.headers["x-gateway-model"] == "mock-a"
        assert record_for(gw, raw.headers["x-request-id"])["features"]["sensitive_findings"] == ["URL_PASSWORD"]
    assert [a["model"] for a in upstream.attempts()] == ["up-a", "up-a"]
