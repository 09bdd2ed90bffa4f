"""Bad input and bad answers on the translated paths, through the real gateway and SDKs:
a wrongly typed field is the caller's 400 (never a 500), a malformed upstream answer is a 502
that is still audited, settled and leaves no capacity slot behind, count_tokens never mirrors
to a shadow and never undercounts a Claude model offline, and an Anthropic pass-through stream
keeps the upstream's error type."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway import tokens, translation
from gateway.parsing_anthropic import estimate_messages_input
from tests.gateway.test_e2e_anthropic import golden_frames
from tests.gateway.test_e2e_openai import audit_rows, wait_for
from tests.harness import DEFAULT_POLICY, TENANT_KEY, RunningGateway, UpstreamProcess

HI: list[Any] = [{"role": "user", "content": "hi"}]
SHADOWED = {"name": "shadowed", "when": {"model": "shadowed"}, "candidates": ["mock-a"],
            "shadow": {"model": "mock-b", "sample": 1.0, "account": "shadow-evals"}}
CLAUDE_FIRST = {"name": "claude-first", "when": {"model": "claude-first"}, "candidates": ["claude-a", "mock-a"],
                "objective": "ordered"}
POLICY = {**DEFAULT_POLICY, "routes": [SHADOWED, CLAUDE_FIRST, *DEFAULT_POLICY["routes"]]}
CLAUDE = {"name": "claude-a", "provider": "anthro", "upstream_model": "claude-mock", "input_usd_per_mtok": 3,
          "output_usd_per_mtok": 15, "max_output_tokens": 512, "quality": 3,
          "capabilities": ["chat", "tools", "json", "vision"]}


def with_claude(gw_config: dict[str, Any], upstream: UpstreamProcess) -> dict[str, Any]:
    gw_config["providers"].append({"name": "anthro", "type": "anthropic", "base_url": upstream.url,
                                   "api_key_env": "TEST_UPSTREAM_KEY", "timeout_s": 10})
    gw_config["models"].append(dict(CLAUDE))
    gw_config["models"][0]["capabilities"] = ["chat", "tools", "json", "vision"]  # mock-a
    return gw_config


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> RunningGateway:
    with_claude(gw_config, upstream)
    return start_gateway(policies=[POLICY])


def post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, timeout=10,
                      headers={"authorization": f"Bearer {TENANT_KEY}", "anthropic-version": "2023-06-01"})


# ------------------------------------------------------------------ 1. wrongly typed fields: 400, never 500
OPENAI_TO_CLAUDE: list[dict[str, Any]] = [
    {"temperature": "hot"},
    {"temperature": True},
    {"top_p": [1]},
    {"stop": 5},
    {"stop": ["ok", 7]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "system", "content": 5}, *HI]},
    {"messages": [{"role": "user", "content": [5]}]},
    {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": 5}]},
    {"messages": [*HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": 5, "arguments": "{}"}}]}]},
    {"messages": [*HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 5}}]}]},
    {"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": 5}}},
]
ANTHROPIC_TO_OPENAI: list[dict[str, Any]] = [
    {"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": 5}},
    {"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool"}},
    {"tools": [{"name": "f", "description": 5, "input_schema": {"type": "object"}}]},
    {"temperature": "hot"},
    {"top_p": {"p": 1}},
    {"metadata": {"user_id": 5}},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": 5}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": ["x"]}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]},
]


@pytest.mark.parametrize("bad", OPENAI_TO_CLAUDE, ids=[json.dumps(b)[:60] for b in OPENAI_TO_CLAUDE])
def test_openai_client_bad_types_for_an_anthropic_model_are_400(
        gw: RunningGateway, upstream: UpstreamProcess, bad: dict[str, Any]) -> None:
    resp = post(gw, "/v1/chat/completions", {"model": "claude-a", "messages": HI, **bad})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["type"]) == ("invalid_request", "invalid_request_error")
    assert "hot" not in error["message"]  # the message is fixed text, never the value
    assert upstream.attempts() == []
    record = wait_for(lambda: audit_rows(gw))[0]
    assert (record["status"], record["error_code"]) == (400, "invalid_request")
    assert gw.runtime.shedder.active == 0


@pytest.mark.parametrize("bad", ANTHROPIC_TO_OPENAI, ids=[json.dumps(b)[:60] for b in ANTHROPIC_TO_OPENAI])
def test_anthropic_client_bad_types_for_an_openai_model_are_400(
        gw: RunningGateway, upstream: UpstreamProcess, bad: dict[str, Any]) -> None:
    resp = post(gw, "/v1/messages", {"model": "mock-a", "max_tokens": 20, "messages": HI, **bad})
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": body["error"]["message"]}}
    assert "hot" not in body["error"]["message"]
    assert upstream.attempts() == []
    assert gw.runtime.shedder.active == 0


def test_sdks_raise_bad_request_for_bad_types(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    oc = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as oerr:
        oc.chat.completions.create(model="claude-a", messages=HI, extra_body={"temperature": "hot"})
    assert oerr.value.code == "invalid_request"
    ac = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as aerr:
        ac.messages.create(model="mock-a", max_tokens=20, messages=HI, tools=[{"name": "f", "input_schema": {}}],
                           extra_body={"tool_choice": {"type": "tool", "name": 5}})
    assert aerr.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert upstream.attempts() == []


def test_a_bad_type_one_candidate_cannot_translate_falls_over_to_the_same_format_one(
        gw: RunningGateway, upstream: UpstreamProcess) -> None:
    # The Anthropic model cannot take `stop: 5`; the OpenAI-type fallback gets the body as sent, to judge itself.
    resp = post(gw, "/v1/chat/completions", {"model": "claude-first", "messages": HI, "stop": 5})
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-a"
    assert [a["path"] for a in upstream.attempts()] == ["/v1/chat/completions"]
    assert upstream.attempts()[-1]["body"]["stop"] == 5


# ------------------------------------------------------------------ 2. malformed upstream answers: 502, settled
@pytest.fixture
def tight(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
          upstream: UpstreamProcess) -> RunningGateway:
    """Room for one reservation (~540 tokens) at a time: a leaked one refuses the next request."""
    with_claude(gw_config, upstream)
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_tokens": 800}]
    return start_gateway(policies=[POLICY], max_active_requests=1, queue_timeout_s=0.5)


ANTHROPIC_BAD = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-mock", "content": 5,
                 "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 2}}
OPENAI_BAD = {"id": "c1", "object": "chat.completion", "model": "up-a", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi", "tool_calls": 5}, "finish_reason": "stop"}]}


@pytest.mark.parametrize(("path", "body", "answer"), [
    ("/v1/chat/completions", {"model": "claude-a", "messages": HI}, {"body": ANTHROPIC_BAD}),
    ("/v1/chat/completions", {"model": "claude-a", "messages": HI},
     {"body": {**ANTHROPIC_BAD, "content": "blocks expected"}}),
    ("/v1/chat/completions", {"model": "claude-a", "messages": HI}, {"sse_frames": ["not json at all"]}),
    ("/v1/messages", {"model": "mock-a", "max_tokens": 512, "messages": HI}, {"body": OPENAI_BAD}),
    ("/v1/messages", {"model": "mock-a", "max_tokens": 512, "messages": HI},
     {"body": {**OPENAI_BAD, "choices": [{"index": 0, "message": 5}]}}),
    ("/v1/messages", {"model": "mock-a", "max_tokens": 512, "messages": HI}, {"body": [1, 2]}),
], ids=["anthropic-content-5", "anthropic-content-str", "not-json", "openai-tool-calls-5", "openai-message-5",
        "openai-list"])
def test_malformed_answer_on_a_translated_path_is_a_502_audited_settled_and_released(
        tight: RunningGateway, upstream: UpstreamProcess, path: str, body: dict[str, Any], answer: dict[str, Any]) -> None:
    gw = tight
    upstream.script(answer)
    resp = post(gw, path, body)
    assert resp.status_code == 502, resp.text
    if path == "/v1/messages":
        assert resp.json()["error"]["type"] == "api_error" and resp.json()["type"] == "error"
    else:
        assert resp.json()["error"]["code"] == "upstream_error"
    assert "not json" not in resp.text and "tool_calls" not in resp.text  # never the upstream's body
    record = wait_for(lambda: audit_rows(gw))[0]
    assert (record["status"], record["error_code"], record["outcome"]) == (502, "upstream_error", "error")
    assert gw.runtime.shedder.active == 0 and gw.runtime.in_flight == 0
    # The reservation was settled (or released): the budget has room for the next request again,
    # and the capacity slot is free (max_active_requests=1: a leaked slot would refuse it with 503).
    again = post(gw, path, body)
    assert again.status_code == 200, again.text
    assert wait_for(lambda: len(audit_rows(gw)) == 2)


def test_a_crash_while_rendering_still_settles_audits_and_frees_the_slot(
        tight: RunningGateway, upstream: UpstreamProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in rendering")

    monkeypatch.setattr(translation, "json_answer", broken)  # the gateway runs in this process (tests/harness.py)
    resp = post(tight, "/v1/chat/completions", {"model": "claude-a", "messages": HI})
    assert resp.status_code == 500
    record = wait_for(lambda: audit_rows(tight))[0]
    assert (record["status"], record["outcome"]) == (500, "error")
    assert tight.runtime.shedder.active == 0 and tight.runtime.in_flight == 0
    monkeypatch.undo()
    again = post(tight, "/v1/chat/completions", {"model": "claude-a", "messages": HI})
    assert again.status_code == 200, again.text  # neither the reservation nor the slot leaked


def test_malformed_same_format_answer_without_usage_is_relayed_not_a_crash(
        tight: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"body": {"id": "c", "object": "chat.completion", "choices": 5}})
    resp = post(tight, "/v1/chat/completions", {"model": "mock-a", "messages": HI})
    assert resp.status_code == 200 and resp.json()["choices"] == 5  # same format: forwarded unchanged
    record = wait_for(lambda: audit_rows(tight))[0]
    assert record["status"] == 200 and record["usage_estimated"] is True
    assert tight.runtime.shedder.active == 0


# ------------------------------------------------------------------ 4. count_tokens never mirrors to a shadow
def test_count_tokens_on_a_shadowed_route_sends_no_shadow_copy(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    ac = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    counted = ac.messages.with_raw_response.count_tokens(model="shadowed", messages=HI)
    assert counted.parse().input_tokens > 0 and counted.headers["x-gateway-model"] == "mock-a"
    count_id = counted.headers["x-request-id"]
    # A real request on the same route is mirrored; once its copy is audited, the count's would be too.
    real = ac.messages.with_raw_response.create(model="shadowed", max_tokens=20, messages=HI)
    real_id = real.headers["x-request-id"]
    wait_for(lambda: any(r["request_id"] == f"{real_id}:shadow" for r in audit_rows(gw)))
    wait_for(lambda: gw.runtime.shadow.in_flight == 0)
    ids = [r["request_id"] for r in audit_rows(gw)]
    assert f"{count_id}:shadow" not in ids and count_id in ids
    assert [a["model"] for a in upstream.attempts()] == ["up-a", "up-b"]  # the count itself is offline (mock-a)


# ------------------------------------------------------------------ 5. count_tokens fallback never undercounts Claude
def test_count_tokens_fallback_for_a_claude_model_is_the_upper_bound(gw: RunningGateway,
                                                                     upstream: UpstreamProcess) -> None:
    body: dict[str, Any] = {"model": "claude-a", "system": "You are a careful assistant.",
                            "messages": [{"role": "user", "content": "Summarise the design review notes. " * 20}]}
    upstream.script({"status": 529})
    ac = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    raw = ac.messages.with_raw_response.count_tokens(**body)
    cl100k = estimate_messages_input(body)
    assert raw.headers["x-gateway-token-count"] == "estimated"
    assert raw.parse().input_tokens == tokens.upper_bound(cl100k) > cl100k
    upstream.script({"body": {"unexpected": True}})  # an unreadable answer: the same bound
    assert ac.messages.count_tokens(**body).input_tokens == tokens.upper_bound(cl100k)
    offline = ac.messages.count_tokens(**{**body, "model": "mock-a"})  # an OpenAI-type model: cl100k as counted
    assert offline.input_tokens == cl100k


# ------------------------------------------------------------------ 6. pass-through stream keeps the error type
def test_pass_through_stream_keeps_the_upstream_error_type(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"sse_frames": golden_frames("openai_client__anthropic_upstream", "stream_error"),
                     "chunk_interval_ms": 20})
    ac = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as info, ac.messages.stream(
            model="claude-a", max_tokens=50, messages=HI) as stream:
        stream.get_final_message()
    error = info.value.body["error"]  # type: ignore[index]
    assert error["type"] == "overloaded_error" and "Overloaded" not in error["message"]  # fixed text
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "stream_interrupted"


def test_pass_through_stream_unknown_error_type_is_an_api_error(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    frames = golden_frames("openai_client__anthropic_upstream", "stream_error")
    frames[-1] = frames[-1].replace("overloaded_error", "made_up_error<script>")
    upstream.script({"sse_frames": frames, "chunk_interval_ms": 20})
    with httpx.stream("POST", f"{gw.url}/v1/messages", headers={"x-api-key": TENANT_KEY}, timeout=10,
                      json={"model": "claude-a", "max_tokens": 50, "stream": True, "messages": HI}) as resp:
        raw = resp.read().decode()
    errors = [f for f in raw.split("\n\n") if f.startswith("event: error")]
    assert len(errors) == 1 and '"type":"api_error"' in errors[0] and "made_up" not in raw
