"""Issue 6: honest streams. Before the first content byte reaches the client an error, a cut,
a stall or an empty stream fails over invisibly (one clean stream); after it there is no
splice: an in-band error frame and no [DONE] / message_stop, tokens so far settled, audit
`stream_interrupted`. Timeouts per provider and per route; the upstream's [DONE] ends the
client stream at once; a client disconnect cancels the upstream call."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway.faultkit import (
    HI,
    WORDS,
    ac,
    add_models,
    audit_rows,
    ledger,
    oc,
    policy,
    post_chat,
    route,
    upstream_models,
    wait_for,
)
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess

ROUTES = policy(route("ab", ["mock-a", "mock-b"]), route("claude-first", ["claude-a", "mock-a"]),
                route("quick", ["mock-a"], timeouts={"idle_s": 0.3}))


def oa_chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


ROLE = oa_chunk({"role": "assistant", "content": ""})
LEAKY_ERROR = 'data: {"error": {"message": "overloaded while reading: my secret prompt", "type": "server_error"}}\n\n'
MALFORMED = "data: {not json\n\n"
USAGE = ('data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":[],'
         '"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n')
FULL = [ROLE, oa_chunk({"content": "Hello"}), oa_chunk({"content": " there"}), oa_chunk({}, "stop"), USAGE,
        "data: [DONE]\n\n"]


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> RunningGateway:
    add_models(gw_config, upstream.url)
    gw_config["providers"][0]["idle_timeout_s"] = 1.0  # primary (mock-a): a stall ends after 1 s
    return start_gateway(policies=ROUTES)


def raw_openai_stream(gw: RunningGateway, model: str, timeout: float = 20) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": model, "stream": True, "messages": HI}, timeout=timeout) as resp:
        lines = [line for line in resp.iter_lines() if line]
    return resp, lines


def raw_anthropic_stream(gw: RunningGateway, model: str) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{gw.url}/v1/messages", headers={"x-api-key": TENANT_KEY}, timeout=20,
                      json={"model": model, "stream": True, "max_tokens": 50, "messages": HI}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    return resp, lines


def sdk_text(gw: RunningGateway, model: str) -> str:
    stream = oc(gw).chat.completions.create(model=model, messages=HI, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


# ---------------------------------------------------------------- before the first content: invisible failover
@pytest.mark.parametrize("first", [
    {"sse_frames": [LEAKY_ERROR]},                                   # an error as the first frame
    {"sse_frames": [ROLE, LEAKY_ERROR]},                             # after the held role chunk
    {"sse_frames": []},                                              # an empty 200 stream
    {"sse_frames": [ROLE, MALFORMED, oa_chunk({"content": "x"})]},   # a malformed frame
    {"text": WORDS, "cut_after_chunks": 1},                          # cut after the role chunk
    {"status": 503},                                                 # an error status
])
def test_failure_before_content_fails_over_invisibly(gw: RunningGateway, upstream: UpstreamProcess,
                                                     first: dict[str, Any]) -> None:
    upstream.script(first, {"status": 503})
    resp, lines = raw_openai_stream(gw, "ab")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-b"
    assert sum('"role":"assistant"' in line for line in lines) == 1  # one stream, never two spliced
    assert lines[-1] == "data: [DONE]" and not any("error" in line for line in lines)
    assert upstream_models(upstream.attempts()) == ["up-a", "up-a", "up-b"]
    assert sdk_text(gw, "ab").startswith("Hello from the fake upstream")
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "ok"


def test_anthropic_error_before_content_fails_over_to_one_clean_stream(gw: RunningGateway,
                                                                       upstream: UpstreamProcess) -> None:
    start = {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "model": "c",
                                                  "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}}}
    frames = [f"event: message_start\ndata: {json.dumps(start)}\n\n", 'event: ping\ndata: {"type": "ping"}\n\n',
              'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n']
    upstream.script({"sse_frames": frames}, {"status": 529})
    resp, lines = raw_anthropic_stream(gw, "claude-first")
    assert resp.headers["x-gateway-model"] == "mock-a"
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names.count("message_start") == 1 and names[-1] == "message_stop" and "error" not in names
    upstream.reset()
    upstream.script({"sse_frames": frames})
    with ac(gw).messages.stream(model="claude-first", max_tokens=50, messages=HI) as stream:
        assert stream.get_final_message().content[0].text.startswith("Hello")  # type: ignore[union-attr]


def test_error_status_before_a_stream_keeps_its_status(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 400, "body": {"error": {"message": "bad: my prompt", "code": "invalid_value"}}})
    with pytest.raises(openai.BadRequestError) as info:
        oc(gw).chat.completions.create(model="mock-a", messages=HI, stream=True)
    assert info.value.status_code == 400 and "my prompt" not in str(info.value.body)
    upstream.script({"status": 400, "body": {"type": "error", "error": {"type": "invalid_request_error",
                                                                        "message": "bad"}}})
    with pytest.raises(anthropic.BadRequestError):
        ac(gw).messages.create(model="claude-a", max_tokens=20, messages=HI, stream=True)


# ---------------------------------------------------------------- after the first content: in-band error
@pytest.mark.parametrize("fault", [
    {"text": WORDS, "cut_after_chunks": 6},
    {"sse_frames": [ROLE, oa_chunk({"content": "Hello"}), MALFORMED, oa_chunk({"content": "x"})],
     "chunk_interval_ms": 10},
    {"sse_frames": [ROLE, oa_chunk({"content": "Hello"}), LEAKY_ERROR], "chunk_interval_ms": 10},
    {"sse_frames": [ROLE, oa_chunk({"content": "Hello"})], "chunk_interval_ms": 10},  # ends without [DONE]
])
def test_failure_after_content_is_an_in_band_error(gw: RunningGateway, upstream: UpstreamProcess,
                                                   fault: dict[str, Any]) -> None:
    upstream.script(fault)
    resp, lines = raw_openai_stream(gw, "ab")
    assert resp.status_code == 200
    assert lines[-1].startswith('data: {"error":') and "[DONE]" not in "".join(lines)
    assert "secret prompt" not in "".join(lines) and "not json" not in "".join(lines)
    assert upstream_models(upstream.attempts()) == ["up-a"]  # no retry, no second stream
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["outcome"] == "stream_interrupted" and record["model_served"] == "mock-a"
    row = wait_for(lambda: ledger(gw))[0]
    assert row[3] > 0 and row[4] == "stream_interrupted"  # the tokens produced so far are settled
    upstream.script(fault)
    stream = oc(gw).chat.completions.create(model="ab", messages=HI, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


@pytest.mark.parametrize("model", ["claude-a", "mock-a"])
def test_anthropic_client_gets_an_error_event_after_content(gw: RunningGateway, upstream: UpstreamProcess,
                                                            model: str) -> None:
    upstream.script({"text": WORDS, "cut_after_chunks": 6})
    _, lines = raw_anthropic_stream(gw, model)
    assert lines[-2] == "event: error" and "message_stop" not in "".join(lines)
    upstream.script({"text": WORDS, "cut_after_chunks": 6})
    with pytest.raises(anthropic.APIStatusError), ac(gw).messages.stream(
            model=model, max_tokens=50, messages=HI) as stream:
        stream.get_final_message()
    assert len(upstream.attempts()) == 2


# ---------------------------------------------------------------- timeouts
def test_a_stalled_stream_is_ended_by_the_idle_timeout(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": WORDS, "stall_after_chunks": 4})
    t0 = time.monotonic()
    _, lines = raw_openai_stream(gw, "mock-a")
    assert 0.9 < time.monotonic() - t0 < 5
    assert lines[-1].startswith('data: {"error":')
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "stream_interrupted"


def test_route_timeouts_override_the_providers(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": WORDS, "stall_after_chunks": 4})
    t0 = time.monotonic()
    _, lines = raw_openai_stream(gw, "quick")  # idle_s: 0.3 on the route, 1.0 on the provider
    assert time.monotonic() - t0 < 0.9 and lines[-1].startswith('data: {"error":')


def test_stall_before_content_hits_the_first_byte_timeout_and_fails_over(
        gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw_config["providers"][0].update({"first_byte_timeout_s": 0.4, "idle_timeout_s": 5})
    gw = start_gateway()
    upstream.script({"text": WORDS, "stall_after_chunks": 1}, {"delay_ms": 2000})  # role chunk, then nothing
    t0 = time.monotonic()
    resp, lines = raw_openai_stream(gw, "fast")
    assert time.monotonic() - t0 < 2.5
    assert resp.headers["x-gateway-model"] == "mock-b" and lines[-1] == "data: [DONE]"
    assert [a["error"] for a in wait_for(lambda: audit_rows(gw))[0]["attempts"]] == ["timeout", "timeout", None]


def test_total_timeout_ends_a_long_stream(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
                                          upstream: UpstreamProcess) -> None:
    gw_config["providers"][0]["total_timeout_s"] = 1.0
    gw = start_gateway()
    upstream.script({"text": " ".join(f"w{i}" for i in range(400)), "chunk_interval_ms": 20})
    t0 = time.monotonic()
    _, lines = raw_openai_stream(gw, "mock-a")
    assert 0.9 < time.monotonic() - t0 < 3 and lines[-1].startswith('data: {"error":')


# ---------------------------------------------------------------- the end of a stream
def test_done_ends_the_client_stream_even_if_the_upstream_keeps_the_connection(gw: RunningGateway,
                                                                              upstream: UpstreamProcess) -> None:
    """llama.cpp keeps its connection open after [DONE]: the answer is complete all the same."""
    upstream.script({"sse_frames": FULL, "stall_after_chunks": len(FULL)})
    t0 = time.monotonic()
    _, lines = raw_openai_stream(gw, "mock-a", timeout=5)
    assert time.monotonic() - t0 < 1.0 and lines[-1] == "data: [DONE]"
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["outcome"] == "ok" and record["output_tokens"] == 2 and not record["usage_estimated"]
    assert wait_for(lambda: upstream.attempts()[0]["ended"])  # and the upstream connection was let go


def test_anthropic_message_stop_ends_the_stream_at_once(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": "one two", "stall_after_chunks": 8})  # every frame sent, connection kept open
    t0 = time.monotonic()
    with ac(gw).messages.stream(model="claude-a", max_tokens=50, messages=HI) as stream:
        assert stream.get_final_message().content[0].text == "one two"  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 1.0
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "ok"


def test_client_disconnect_cancels_the_upstream_within_a_second(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"text": " ".join(f"w{i}" for i in range(300)), "chunk_interval_ms": 50})
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
        json={"model": "mock-a", "messages": HI, "stream": True},
    ) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(8)]
        assert any(line.startswith("data: ") for line in got)
    left = time.time()
    attempt = wait_for(lambda: upstream.attempts()[0] if upstream.attempts()[0]["ended"] else None, timeout=3)
    assert attempt["client_gone"] and attempt["ended"] - left < 1.0
    record = wait_for(lambda: audit_rows(gw))[0]
    assert record["outcome"] == "client_disconnected"
    row = wait_for(lambda: ledger(gw))[0]
    assert 0 < row[3] < 300 and row[4] == "client_disconnected"
    assert wait_for(lambda: gw.runtime.in_flight == 0 and gw.runtime.shedder.active == 0)


def test_client_leaving_before_the_first_content_cancels_the_upstream(gw: RunningGateway,
                                                                      upstream: UpstreamProcess) -> None:
    upstream.script({"delay_ms": 5000})  # the upstream is still "thinking" when the client gives up
    with pytest.raises(httpx.ReadTimeout):
        raw_openai_stream(gw, "mock-a", timeout=0.5)
    left = time.time()
    attempt = wait_for(lambda: upstream.attempts()[0] if upstream.attempts()[0]["ended"] else None, timeout=3)
    assert attempt["client_gone"] and attempt["ended"] - left < 1.0
    record = wait_for(lambda: audit_rows(gw))[0]
    assert (record["outcome"], record["status"]) == ("client_disconnected", 499)
    assert wait_for(lambda: gw.runtime.in_flight == 0 and gw.runtime.shedder.active == 0)
    assert post_chat(gw, "mock-a").status_code == 200  # and the breaker holds nothing against mock-a
    assert gw.runtime.breakers.closed("mock-a")


def test_a_finish_reason_without_done_is_a_complete_answer(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    """Some OpenAI-compatible servers close after the finish chunk without [DONE]: complete, not cut."""
    upstream.script({"sse_frames": [ROLE, oa_chunk({"content": "Hello"}), oa_chunk({}, "stop")],
                     "chunk_interval_ms": 10})
    _, lines = raw_openai_stream(gw, "mock-a")
    assert lines[-1] == "data: [DONE]" and not any("error" in line for line in lines)
    assert wait_for(lambda: audit_rows(gw))[0]["outcome"] == "ok"
