"""Issue 6: circuit breakers per model deployment, against the real fake upstream process:
open on failures in a row or an error ratio, growing cooldown, one half-open probe, never every
candidate open at once, visible in /metrics and explain, shared by replicas through Redis."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.gateway.faultkit import (
    HI,
    add_models,
    explain,
    metric_value,
    metrics,
    oc,
    policy,
    post_chat,
    route,
    upstream_models,
    wait_for,
)
from tests.harness import RunningGateway, UpstreamProcess
from tests.services import REDIS_URL, redis_prefix

ROUTES = policy(route("ab", ["mock-a", "mock-b"]))
# Scripts are consumed in order by every upstream call: a fails, a fails, b answers; a fails (3rd: open).
OPEN_A: list[dict[str, Any]] = [{"status": 503}, {"status": 503}, {}, {"status": 503}]
FAST_BREAKER = {"breaker_failure_threshold": 3, "breaker_cooldown_s": 0.5, "breaker_max_cooldown_s": 10}


@pytest.fixture
def start(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
          upstream: UpstreamProcess) -> Callable[..., RunningGateway]:
    add_models(gw_config, upstream.url)
    return lambda **settings: start_gateway(policies=ROUTES, **{**FAST_BREAKER, **settings})


def rejected(gw: RunningGateway, model: str) -> dict[str, str]:
    return {r["model"]: r["reason"] for r in explain(gw, model)["rejected"]}


def test_failures_in_a_row_open_the_breaker_and_routing_skips_the_model(
        start: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start()
    upstream.script(*OPEN_A)
    assert post_chat(gw, "ab").headers["x-gateway-model"] == "mock-b"  # a, a, b
    assert post_chat(gw, "ab").headers["x-gateway-model"] == "mock-b"  # a (third failure: open), b
    assert upstream_models(upstream.attempts()) == ["up-a", "up-a", "up-b", "up-a", "up-b"]
    upstream.reset()
    resp = post_chat(gw, "ab")
    assert resp.headers["x-gateway-model"] == "mock-b" and resp.headers["x-gateway-attempts"] == "1"
    assert upstream_models(upstream.attempts()) == ["up-b"]
    assert rejected(gw, "ab") == {"mock-a": "circuit open: 3 failures in a row"}
    text = metrics(gw)
    assert metric_value(text, "gateway_breaker_state", model="mock-a", provider="primary") == 1
    assert metric_value(text, "gateway_breaker_state", model="mock-b", provider="hosted") == 0
    assert metric_value(text, "gateway_breaker_transitions_total", model="mock-a", state="open") == 1
    # primary still has a routable model (mock-embed): the provider as a whole is not skipped
    assert metric_value(text, "gateway_provider_breaker_state", provider="primary") == 0
    # the audit record names the rejection too
    from tests.gateway.faultkit import audit_rows
    last = wait_for(lambda: [r for r in audit_rows(gw) if r["attempts"] and len(r["attempts"]) == 1])[-1]
    assert ["mock-a", "circuit open: 3 failures in a row"] in last["features"]["rejected"]


def test_half_open_probe_closes_after_the_cooldown(start: Callable[..., RunningGateway],
                                                   upstream: UpstreamProcess) -> None:
    gw = start()
    upstream.script(*OPEN_A)
    post_chat(gw, "ab")
    post_chat(gw, "ab")
    assert "mock-a" in rejected(gw, "ab")
    wait_for(lambda: "mock-a" not in rejected(gw, "ab"), timeout=3)  # cooldown over: half-open, routable
    assert metric_value(metrics(gw), "gateway_breaker_state", model="mock-a") == 2
    upstream.reset()
    resp = post_chat(gw, "ab")  # the probe
    assert resp.headers["x-gateway-model"] == "mock-a" and upstream_models(upstream.attempts()) == ["up-a"]
    text = metrics(gw)
    assert metric_value(text, "gateway_breaker_state", model="mock-a") == 0
    assert metric_value(text, "gateway_breaker_transitions_total", model="mock-a", state="closed") == 1


def test_a_failed_probe_reopens_with_a_longer_cooldown(start: Callable[..., RunningGateway],
                                                       upstream: UpstreamProcess) -> None:
    gw = start()
    breaker = gw.runtime.breakers._by_name["mock-a"]
    upstream.script(*OPEN_A)
    post_chat(gw, "ab")
    post_chat(gw, "ab")
    first = breaker.until - time.monotonic()
    assert 0.3 < first <= 0.5
    wait_for(lambda: "mock-a" not in rejected(gw, "ab"), timeout=3)
    upstream.reset()
    upstream.script({"status": 503})
    resp = post_chat(gw, "ab")  # the probe fails: open again at once, no retry on it
    assert resp.headers["x-gateway-model"] == "mock-b" and upstream_models(upstream.attempts()) == ["up-a", "up-b"]
    second = breaker.until - time.monotonic()
    assert 0.8 < second <= 1.0  # doubled
    assert rejected(gw, "ab")["mock-a"] == "circuit open: half-open probe failed"


def test_only_one_half_open_probe_at_a_time(start: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start()
    upstream.script(*OPEN_A)
    post_chat(gw, "ab")
    post_chat(gw, "ab")
    wait_for(lambda: "mock-a" not in rejected(gw, "ab"), timeout=3)
    upstream.reset()
    import concurrent.futures

    upstream.script({"delay_ms": 600})  # the probe is slow; the requests meanwhile skip mock-a
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        probe = pool.submit(post_chat, gw, "ab")
        wait_for(lambda: upstream.attempts(), timeout=3)
        others = [pool.submit(post_chat, gw, "ab") for _ in range(3)]
        served = [f.result().headers["x-gateway-model"] for f in others]
        assert probe.result().headers["x-gateway-model"] == "mock-a"
    assert served == ["mock-b"] * 3
    assert upstream_models(upstream.attempts()).count("up-a") == 1


def test_every_candidate_open_tries_the_least_recently_failed(start: Callable[..., RunningGateway],
                                                               upstream: UpstreamProcess) -> None:
    gw = start(breaker_failure_threshold=1, breaker_cooldown_s=30)
    upstream.script({"status": 503}, {"status": 503})
    assert post_chat(gw, "ab").status_code == 502  # a fails (open), b fails (open)
    assert set(rejected(gw, "ab")) == {"mock-a", "mock-b"}
    upstream.reset()
    resp = post_chat(gw, "ab")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "mock-a"  # failed first
    assert upstream_models(upstream.attempts()) == ["up-a"]
    assert "mock-a" not in rejected(gw, "ab")  # its success closed it


def test_error_ratio_over_the_window_opens_the_breaker(start: Callable[..., RunningGateway],
                                                       upstream: UpstreamProcess) -> None:
    gw = start(breaker_failure_threshold=100, breaker_min_requests=5, breaker_error_ratio=0.5, breaker_window_s=60)
    for _ in range(2):
        upstream.script({"status": 503})  # then the retry succeeds: one failure, one success per request
        assert post_chat(gw, "mock-a").status_code == 200
    upstream.script({"status": 503})
    assert post_chat(gw, "mock-a").status_code == 502  # 3 of 5 failed: open, so no retry on it
    assert rejected(gw, "ab") == {"mock-a": "circuit open: 60% of 5 attempts failed in 60s"}


def test_one_rate_limit_does_not_open_the_breaker(start: Callable[..., RunningGateway],
                                                  upstream: UpstreamProcess) -> None:
    gw = start()
    upstream.script({"status": 429, "headers": {"retry-after": "30"}})
    assert post_chat(gw, "ab").headers["x-gateway-model"] == "mock-b"
    assert rejected(gw, "ab") == {}
    assert post_chat(gw, "ab").headers["x-gateway-model"] == "mock-a"


def test_breaker_state_is_shared_through_redis(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
                                               upstream: UpstreamProcess) -> None:
    with redis_prefix() as prefix:
        add_models(gw_config, upstream.url)
        gw_config["state"].update({"redis_url": REDIS_URL, "redis_key_prefix": prefix})
        settings = {**FAST_BREAKER, "breaker_failure_threshold": 2, "breaker_cooldown_s": 30, "breaker_sync_s": 0.05}
        one = start_gateway(policies=ROUTES, **settings)
        two = start_gateway(policies=ROUTES, **settings)
        upstream.script({"status": 503}, {"status": 503})
        assert post_chat(one, "ab").headers["x-gateway-model"] == "mock-b"
        assert "mock-a" in rejected(one, "ab")
        wait_for(lambda: rejected(two, "ab").get("mock-a") == "circuit open: 2 failures in a row", timeout=5)
        upstream.reset()
        resp = post_chat(two, "ab")
        assert resp.headers["x-gateway-model"] == "mock-b" and upstream_models(upstream.attempts()) == ["up-b"]
        assert metric_value(metrics(two), "gateway_breaker_state", model="mock-a") == 1


def test_sdk_sees_a_clean_answer_while_a_breaker_is_open(start: Callable[..., RunningGateway],
                                                         upstream: UpstreamProcess) -> None:
    gw = start()
    upstream.script(*OPEN_A)
    client = oc(gw)
    for _ in range(3):
        assert client.chat.completions.create(model="ab", messages=HI).choices[0].message.content
