"""Issue 6: what is retried, what falls over, what is returned; the retry budget; fallback
visibility. Real SDKs -> real gateway -> the real scripted fake upstream process."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.gateway.faultkit import (
    HI,
    ac,
    add_models,
    audit_rows,
    explain,
    metric_value,
    metrics,
    oa_error,
    oc,
    policy,
    post_chat,
    route,
    upstream_models,
    wait_for,
)
from tests.harness import RunningGateway, UpstreamProcess

ROUTES = policy(route("abc", ["mock-a", "mock-b", "mock-c"]), route("ab", ["mock-a", "mock-b"]),
                route("two", ["mock-a", "mock-b"], max_attempts=2), route("ctx", ["mock-a", "mock-big"]),
                route("ctx-same", ["mock-a", "mock-b"]), route("claude", ["claude-a"]))


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> RunningGateway:
    add_models(gw_config, upstream.url)
    return start_gateway(policies=ROUTES)


def test_openai_sdk_retries_do_not_multiply_upstream_calls(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 503}] * 30)
    with pytest.raises(openai.InternalServerError) as info:
        oc(gw, max_retries=2).chat.completions.create(model="ab", messages=HI)
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert info.value.response.headers["x-gateway-attempts"] == "3"
    assert len(upstream.attempts()) == 3  # the gateway's budget, and the SDK did not retry it


def test_anthropic_sdk_retries_do_not_multiply_upstream_calls(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 529}] * 30)
    with pytest.raises(anthropic.APIStatusError) as info:
        ac(gw, max_retries=2).messages.create(model="claude", max_tokens=20, messages=HI)
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.attempts()) == 2  # one candidate: its two tries, once


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_retry_once_then_fall_over(gw: RunningGateway, upstream: UpstreamProcess, status: int) -> None:
    upstream.script({"status": status}, {"status": status})
    raw = oc(gw).chat.completions.with_raw_response.create(model="ab", messages=HI)
    assert raw.parse().choices[0].message.content
    assert upstream_models(upstream.attempts()) == ["up-a", "up-a", "up-b"]
    assert raw.headers["x-gateway-attempts"] == "3" and raw.headers["x-gateway-model"] == "mock-b"


# What llama-cpp-python answers (checked against the real server): its own request validation
# failing is a 500 with FastAPI's validation text; a failure inside the model is a 500 too.
LLAMA_VALIDATION_500 = {"status": 500, "body": {"error": {
    "message": "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'temperature'), 'msg': 'Input "
               "should be a valid number, unable to parse string as a number', 'input': 'hot'}\n\n  File \"/x/"
               "llama_cpp/server/app.py\", line 376, in create_chat_completion\n    POST /v1/chat/completions",
    "type": "internal_server_error", "param": None, "code": None}}}
LLAMA_FAILURE_500 = {"status": 500, "body": {"error": {
    "message": "llama_decode returned -1", "type": "internal_server_error", "param": None, "code": None}}}


def test_a_validation_500_is_the_callers_bad_request(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(LLAMA_VALIDATION_500)
    with pytest.raises(openai.BadRequestError) as info:
        oc(gw).chat.completions.create(model="ab", messages=HI, temperature="hot")  # type: ignore[arg-type]
    assert info.value.status_code == 400 and info.value.code == "invalid_request"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "float_parsing" not in str(info.value.body) and "llama_cpp" not in str(info.value.body)
    assert upstream_models(upstream.attempts()) == ["up-a"]  # neither retried nor sent to mock-b
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["status"] == 400 and [a["status"] for a in record["attempts"]] == [400]


def test_any_other_500_is_still_an_outage(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(LLAMA_FAILURE_500, LLAMA_FAILURE_500)
    raw = oc(gw).chat.completions.with_raw_response.create(model="ab", messages=HI)
    assert raw.headers["x-gateway-model"] == "mock-b" and raw.headers["x-gateway-attempts"] == "3"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-a", "up-b"]


def test_retry_budget_spreads_over_candidates(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 503}] * 10)
    resp = post_chat(gw, "abc")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-b", "up-c"]  # 3 attempts in all, one each


def test_route_max_attempts_caps_attempts(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(*[{"status": 503}] * 10)
    resp = post_chat(gw, "two")
    assert resp.status_code == 502 and resp.headers["x-gateway-attempts"] == "2"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-b"]


def test_short_rate_limit_is_retried_on_the_same_model(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({**oa_error(429, "rate_limit_exceeded"), "headers": {"retry-after-ms": "200"}})
    resp = post_chat(gw, "ab")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-a"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-a"]


def test_long_retry_after_falls_over_at_once(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({**oa_error(429, "rate_limit_exceeded"), "headers": {"retry-after": "30"}})
    resp = post_chat(gw, "ab")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-b"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-b"]


def test_connect_errors_retry_then_fall_over(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    raw = oc(gw).chat.completions.with_raw_response.create(model="flaky", messages=HI)
    assert raw.headers["x-gateway-model"] == "mock-a" and raw.headers["x-gateway-attempts"] == "3"
    record = wait_for(lambda: audit_rows(gw))[0]
    assert [(a["model"], a["outcome"], a["error"]) for a in record["attempts"]] == [
        ("mock-dead", "error", "connect"), ("mock-dead", "error", "connect"), ("mock-a", "ok", None)]


def test_timeout_before_headers_retries_then_falls_over(gw_config: dict[str, Any], upstream: UpstreamProcess,
                                                        start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["providers"][0]["first_byte_timeout_s"] = 0.3  # primary (mock-a)
    gw = start_gateway()
    upstream.script({"delay_ms": 1500}, {"delay_ms": 1500})
    resp = post_chat(gw, "fast")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-b"
    record = wait_for(lambda: audit_rows(gw))[0]
    assert [a["error"] for a in record["attempts"]] == ["timeout", "timeout", None]
    upstream.script(*[{"delay_ms": 1500}] * 2)
    resp = post_chat(gw, "mock-a")
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_error"
    assert resp.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(("answer", "why"), [
    (oa_error(429, "insufficient_quota"), "quota exhausted"),
    (oa_error(401, "invalid_api_key"), "refused the gateway's key (HTTP 401)"),
    (oa_error(403, "permission_denied"), "refused the gateway's key (HTTP 403)"),
])
def test_refused_key_or_quota_falls_over_and_marks_the_provider(gw: RunningGateway, upstream: UpstreamProcess,
                                                                answer: dict[str, Any], why: str) -> None:
    upstream.script(answer)
    resp = post_chat(gw, "ab")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-b"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-b"]  # never retried on that provider
    # The provider is out of rotation: the next request goes straight to mock-b.
    resp = post_chat(gw, "ab")
    assert resp.headers["x-gateway-model"] == "mock-b" and resp.headers["x-gateway-attempts"] == "1"
    rejected = {r["model"]: r["reason"] for r in explain(gw, "ab")["rejected"]}
    assert rejected["mock-a"].startswith("circuit open: provider") and why in rejected["mock-a"]


def test_refused_key_with_nothing_left_is_a_502_never_a_401(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(oa_error(401, "invalid_api_key", "Incorrect API key provided: sk-upst***"))
    with pytest.raises(openai.InternalServerError) as info:
        oc(gw, max_retries=2).chat.completions.create(model="mock-a", messages=HI)
    assert info.value.status_code == 502 and info.value.body["code"] == "upstream_error"  # type: ignore[index]
    assert "sk-upst" not in str(info.value.body)
    assert len(upstream.attempts()) == 1
    # Marked unhealthy: the next request fails fast without calling the provider with a bad key.
    resp = post_chat(gw, "mock-a")
    assert resp.status_code == 502 and resp.headers["x-should-retry"] == "false"
    assert len(upstream.attempts()) == 1


def test_context_length_falls_over_only_to_a_larger_window(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    too_long = oa_error(400, "context_length_exceeded",
                        "This model's maximum context length is 8192 tokens. However, your messages resulted in "
                        "9100 tokens. Please reduce the length of the messages.")
    upstream.script(too_long)
    resp = post_chat(gw, "ctx")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-big"
    assert upstream_models(upstream.attempts()) == ["up-a", "up-big"]
    upstream.reset()
    upstream.script(too_long)
    with pytest.raises(openai.BadRequestError) as info:
        oc(gw).chat.completions.create(model="ctx-same", messages=HI)  # mock-b's window is no larger
    assert "context_length_exceeded" in info.value.message and "9100" not in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    assert upstream_models(upstream.attempts()) == ["up-a"]


@pytest.mark.parametrize(("status", "error"), [(400, openai.BadRequestError), (422, openai.UnprocessableEntityError),
                                               (404, None)])
def test_other_client_errors_are_returned_never_retried(gw: RunningGateway, upstream: UpstreamProcess, status: int,
                                                        error: type[Exception] | None) -> None:
    upstream.script(oa_error(status, "content_filter", "the prompt 'my secret plan' was refused"))
    if error is None:  # a 404 is the deployment's problem (unknown upstream model): the next candidate
        assert post_chat(gw, "ab").headers["x-gateway-model"] == "mock-b"
        return
    with pytest.raises(error) as info:
        oc(gw).chat.completions.create(model="ab", messages=HI)
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert "secret plan" not in str(info.value.body) and "content_filter" in str(info.value.body)  # type: ignore[attr-defined]
    assert upstream_models(upstream.attempts()) == ["up-a"]  # never on a laxer model


def test_fallback_is_visible_in_headers_audit_and_metrics(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 503}, {"status": 503})
    raw = oc(gw).chat.completions.with_raw_response.create(model="ab", messages=HI)
    assert raw.headers["x-gateway-attempts"] == "3"
    record = wait_for(lambda: audit_rows(gw))[0]
    attempts = record["attempts"]
    assert [(a["model"], a["outcome"], a["status"]) for a in attempts] == [
        ("mock-a", "error", 503), ("mock-a", "error", 503), ("mock-b", "ok", 200)]
    assert all(a["latency_ms"] >= 0 for a in attempts)
    text = metrics(gw)
    assert metric_value(text, "gateway_upstream_retries_total", model="mock-a") == 1
    assert metric_value(text, "gateway_upstream_failovers_total", model="mock-a") == 1
    assert metric_value(text, "gateway_fallbacks_total") == 1


def test_connect_timeout_falls_over(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
                                    upstream: UpstreamProcess) -> None:
    """A listener that never accepts, its backlog full: connecting hangs until connect_timeout_s."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            gw_config["providers"][2].update({"base_url": f"http://127.0.0.1:{port}/v1", "connect_timeout_s": 0.3})
            gw = start_gateway()
            t0 = time.monotonic()
            resp = post_chat(gw, "flaky")  # mock-dead (now the black hole), then mock-a
            assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-a"
            assert time.monotonic() - t0 < 2.5
            record = wait_for(lambda: audit_rows(gw))[0]
            assert [a["error"] for a in record["attempts"]] == ["timeout", "timeout", None]
        finally:
            for filler in fillers:
                filler.close()
