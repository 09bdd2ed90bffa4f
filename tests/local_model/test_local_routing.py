"""Routing around a real local model server: active health checks take a stopped llama.cpp
server out of rotation within seconds and bring it back when it answers again, confidential
prompts never leave the machine, and llama.cpp's 500 for a malformed request is the caller's
400, not an outage."""
from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.explain import explain
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess
from tests.local_model.conftest import LlamaServer, wait_until

pytestmark = pytest.mark.local_model

HI: Any = [{"role": "user", "content": "Say hello."}]
CONFIDENTIAL = {"x-gateway-data-class": "confidential"}


def oa(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0, timeout=120)


def local_available(gw: RunningGateway) -> bool:
    models = httpx.get(f"{gw.v1}/models", headers={"authorization": f"Bearer {TENANT_KEY}"}).json()["data"]
    return bool(next(m for m in models if m["id"] == "llama-local")["gateway"]["available"])


def test_stopped_server_is_skipped_then_taken_back(local_gateway: RunningGateway, running_llama: LlamaServer,
                                                   upstream: UpstreamProcess) -> None:
    client = oa(local_gateway)
    assert local_available(local_gateway)
    running_llama.stop()
    took_down = wait_until(lambda: not local_available(local_gateway), timeout_s=5)

    raw = client.chat.completions.with_raw_response.create(model="fast", max_tokens=8, messages=HI)
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"  # the hosted fallback (the fake upstream)
    assert raw.headers["x-gateway-attempts"] == "1"  # no attempt at the stopped server
    rt = local_gateway.runtime
    result = explain(rt.loaded, "demo", "fast", None, live_catalog=rt.catalog, health=rt.health.states)
    assert result["chosen"] == "gpt-4o-mini"
    assert result["rejected"] == [{"model": "llama-local", "reason":
                                   f"unhealthy: health check GET {running_llama.url}/docs: connection refused"}]
    # Confidential data never falls back to a hosted model, even with the local one down.
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="fast", max_tokens=8, messages=HI, extra_headers=CONFIDENTIAL)
    assert [a["model"] for a in upstream.attempts()] == ["gpt-4o-mini"]

    restarted_in = running_llama.start()
    came_back = wait_until(lambda: local_available(local_gateway), timeout_s=5)
    raw = client.chat.completions.with_raw_response.create(model="fast", max_tokens=8, messages=HI)
    assert raw.headers["x-gateway-model"] == "llama-local"
    print(f"marked down {took_down:.2f}s after stop; server restart {restarted_in:.2f}s; "
          f"marked up {came_back:.2f}s after it answered")


def test_confidential_prompt_stays_local(local_gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    client = oa(local_gateway)
    raw = client.chat.completions.with_raw_response.create(model="smart", max_tokens=8, messages=HI)
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"  # `smart` prefers hosted while it is up
    assert len(upstream.attempts()) == 1

    raw = client.chat.completions.with_raw_response.create(
        model="smart", max_tokens=8, messages=HI, extra_headers=CONFIDENTIAL)
    assert raw.headers["x-gateway-model"] == "llama-local"
    assert raw.headers["x-gateway-route"].endswith(":sensitive-stays-local")
    assert raw.parse().choices[0].message.content
    # A prompt carrying a secret is confidential by content, without any header.
    leaky: Any = [{"role": "user", "content": "Summarise: contact jane.doe@example.com, card 4111 1111 1111 1111."}]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=8, messages=leaky)
    assert raw.headers["x-gateway-model"] == "llama-local"
    assert len(upstream.attempts()) == 1  # nothing more went to the hosted provider


def test_llama_500_for_a_malformed_request_is_the_callers_400_not_an_outage(
        local_gateway: RunningGateway, running_llama: LlamaServer, upstream: UpstreamProcess) -> None:
    # llama.cpp quirk: a request failing its own validation (a temperature that is no number) is a 500.
    malformed: Any = {"model": "x", "max_tokens": 4, "temperature": "hot", "messages": HI}
    direct = httpx.post(f"{running_llama.url}/v1/chat/completions", json=malformed, timeout=30)
    assert direct.status_code == 500 and "validation error" in direct.json()["error"]["message"]
    client = oa(local_gateway)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="fast", max_tokens=4, messages=HI, temperature="hot",  # type: ignore[arg-type]
                                           stream=stream)
        assert info.value.status_code == 400 and info.value.code == "invalid_request"
        assert info.value.response.headers["x-gateway-attempts"] == "1"  # not retried
    assert upstream.attempts() == []  # nor sent to `fast`'s hosted fallback
    wait_until(lambda: local_gateway.runtime.health.states["local"].checked, timeout_s=2)
    assert local_gateway.runtime.health.states["local"].healthy and local_available(local_gateway)
    reply = client.chat.completions.create(model="fast", max_tokens=8, messages=HI)
    assert reply.choices[0].message.content
