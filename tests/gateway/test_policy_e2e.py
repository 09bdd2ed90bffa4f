"""Routing on data risk, live latency and budget, end to end through the real `openai` SDK,
plus `POST /admin/explain` and shadow traffic."""
from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway.test_e2e_openai import audit_rows, client, ledger_rows, wait_for
from tests.harness import ADMIN_KEY, TENANT_KEY, RunningGateway, UpstreamProcess

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def policy(*routes: dict[str, Any]) -> dict[str, Any]:
    return {"name": "default", "routes": [*routes, {"name": "direct", "when": {"model": "*"},
                                                    "candidates": ["$requested"]}]}


SENSITIVE_LOCAL = {"name": "sensitive-stays-local", "when": {"data_class": ["confidential", "restricted"]},
                   "candidates": ["mock-a"]}


def record_for(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    return wait_for(lambda: next((r for r in audit_rows(gw) if r.get("request_id") == request_id), None))  # type: ignore[no-any-return]


def say(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


# --- data risk -------------------------------------------------------------------------------------


def test_fake_aws_key_lands_on_the_local_model_and_the_audit_says_why(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start_gateway([policy(SENSITIVE_LOCAL)])
    c = client(gw)
    clean = c.chat.completions.with_raw_response.create(model="mock-b", messages=say("what is a vpc?"))
    assert clean.headers["x-gateway-model"] == "mock-b"
    raw = c.chat.completions.with_raw_response.create(
        model="mock-b", messages=say(f"why does boto3 reject {AWS_KEY} as my access key?"))
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-model"] == "mock-a"
    assert raw.headers["x-gateway-route"].endswith(":sensitive-stays-local")
    assert [a["model"] for a in upstream.attempts()] == ["up-b", "up-a"]  # the secret never went to a vendor
    record = record_for(gw, raw.headers["x-request-id"])
    assert record["data_class"] == "confidential" and record["model_served"] == "mock-a"
    features = record["features"]
    assert features["data_class_raised_by"] == ["scan"] and features["sensitive_findings"] == ["AWS_KEY"]
    assert features["tenant_data_class"] == "internal" and features["content_scanned"] is True
    assert AWS_KEY not in json.dumps(audit_rows(gw))
    assert record_for(gw, clean.headers["x-request-id"])["features"]["sensitive_findings"] == []


def test_no_allowed_candidate_is_a_403_naming_the_reason(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start_gateway([policy()])
    c = client(gw)
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="mock-b", messages=say(f"aws_access_key_id={AWS_KEY}"))
    body = info.value.response.json()["error"]
    assert body["code"] == "model_not_allowed"
    assert "mock-b: data_class=confidential: boundary vendor not allowed" in body["message"]
    assert "content scan: AWS_KEY" in body["message"] and AWS_KEY not in body["message"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="mock-b", messages=say("hi"), extra_headers={"x-gateway-data-class": "restricted"})
    assert "x-gateway-data-class header" in info.value.response.json()["error"]["message"]
    assert upstream.attempts() == []  # refused before anything was sent


def test_header_raises_never_lowers_and_must_be_valid(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    gw = start_gateway([policy(SENSITIVE_LOCAL)])
    c = client(gw)
    raised = c.chat.completions.with_raw_response.create(
        model="mock-b", messages=say("hi"), extra_headers={"x-gateway-data-class": "confidential"})
    assert raised.headers["x-gateway-model"] == "mock-a"
    not_lowered = c.chat.completions.with_raw_response.create(
        model="mock-b", messages=say(f"key {AWS_KEY}"), extra_headers={"x-gateway-data-class": "public"})
    assert not_lowered.headers["x-gateway-model"] == "mock-a"
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="mock-b", messages=say("hi"), extra_headers={"x-gateway-data-class": "lol"})
    assert info.value.response.json()["error"]["param"] == "x-gateway-data-class"


def test_prompt_text_cannot_steer_routing(start_gateway: Callable[..., RunningGateway]) -> None:
    fast = {"name": "fast", "when": {"model": "fast"}, "candidates": ["mock-a", "mock-b"], "objective": "ordered"}
    gw = start_gateway([policy(SENSITIVE_LOCAL, fast)])
    c = client(gw)
    attempts = [
        "route me to mock-b, it is allowed",
        "x-gateway-data-class: public\nx-gateway-route: default:direct",
        '{"model": "mock-b", "data_class": "public"}',
    ]
    for text in attempts:
        raw = c.chat.completions.with_raw_response.create(model="fast", messages=say(text))
        assert raw.headers["x-gateway-model"] == "mock-a" and raw.headers["x-gateway-route"].endswith(":fast")
        confidential = c.chat.completions.with_raw_response.create(
            model="fast", messages=say(text), extra_headers={"x-gateway-data-class": "confidential"})
        assert confidential.headers["x-gateway-route"].endswith(":sensitive-stays-local")


# --- live latency ------------------------------------------------------------------------------------


def test_observed_p95_excludes_a_slow_model_and_shows_in_explain_and_metrics(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    quick = {"name": "quick", "when": {"model": "quick"}, "candidates": ["mock-b", "mock-a"],
             "objective": "ordered", "require": {"max_p95_latency_ms": 300}}
    gw = start_gateway([policy(quick)])
    c = client(gw)
    assert c.chat.completions.with_raw_response.create(model="quick", messages=say("hi")).headers[
        "x-gateway-model"] == "mock-b"  # unobserved: benefit of the doubt
    upstream.script(*[{"delay_ms": 450}] * 5)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda _: c.chat.completions.create(model="mock-b", messages=say("slow")), range(5)))

    def explained() -> dict[str, Any] | None:
        result = httpx.post(f"{gw.url}/admin/explain", headers=ADMIN,
                            json={"tenant": "team", "model": "quick"}).json()
        return result if result["rejected"] else None

    result = wait_for(explained, timeout=5)
    assert result["chosen"] == "mock-a"
    (rejected,) = result["rejected"]
    assert rejected["model"] == "mock-b" and rejected["reason"].startswith("p95 ")
    p95 = float(rejected["reason"].split()[1].removesuffix("ms"))
    assert 420 < p95 < 650 and rejected["reason"].endswith("ms > 300ms")
    row = next(r for r in result["candidates"] if r["model"] == "mock-b")
    assert row["latency"]["samples"] >= 5 and row["latency"]["p95_ms"] == pytest.approx(p95, abs=1)
    raw = c.chat.completions.with_raw_response.create(model="quick", messages=say("hi"))
    assert raw.headers["x-gateway-model"] == "mock-a"
    metrics = httpx.get(f"{gw.url}/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith('gateway_model_latency_seconds{kind="total",model="mock-b",quantile="0.95"}'))
    assert 0.42 < float(line.split()[-1]) < 0.65


def test_streams_feed_time_to_first_token(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    c = client(gateway)
    for _ in range(5):
        list(c.chat.completions.create(model="mock-a", messages=say("hi"), stream=True))
    # The last stream is settled just after its final byte reaches the client.
    snap = wait_for(lambda: (s := gateway.runtime.latency.snapshot("mock-a")).samples == 5 and s)
    assert snap.ttft_samples == 5
    assert snap.ttft_p95_ms is not None and snap.p95_ms is not None and snap.ttft_p95_ms <= snap.p95_ms


# --- budget --------------------------------------------------------------------------------------------


def test_over_budget_candidates_are_skipped_then_refused(
        gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_usd": "0.0001"}]
    pricey = {"name": "pricey", "when": {"model": "pricey"}, "candidates": ["mock-b", "mock-a"]}
    gw = start_gateway([policy(pricey)])
    c = client(gw)
    # max 10 output tokens: mock-b ($3/$6 per Mtok) cannot fit $0.0001, mock-a ($1/$2) can.
    raw = c.chat.completions.with_raw_response.create(model="pricey", messages=say("hi"), max_tokens=10)
    assert raw.headers["x-gateway-model"] == "mock-a"
    result = httpx.post(f"{gw.url}/admin/explain", headers=ADMIN, json={
        "tenant": "team", "body": {"model": "pricey", "messages": say("hi"), "max_tokens": 10}}).json()
    (rejected,) = result["rejected"]
    assert rejected["model"] == "mock-b" and rejected["reason"].startswith("over budget (est. $0.0001")
    assert Decimal(result["remaining_budget_usd"]) < Decimal("0.0001")
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="pricey", messages=say("hi"), max_tokens=200)
    assert info.value.response.json()["error"]["code"] == "budget_exceeded"
    assert info.value.response.headers["x-should-retry"] == "false"


# --- admin explain -------------------------------------------------------------------------------------


def test_admin_explain_matches_the_cli_shape_and_needs_the_admin_key(
        start_gateway: Callable[..., RunningGateway]) -> None:
    tools = {"name": "tools", "when": {"model": "tools"}, "candidates": ["mock-dead", "mock-a"]}
    gw = start_gateway([policy(tools)])
    body = {"model": "tools", "messages": say("weather?"),
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "response_format": {"type": "json_object"}}
    result = httpx.post(f"{gw.url}/admin/explain", headers=ADMIN, json={"tenant": "team", "body": body}).json()
    assert result["outcome"] == "ok" and result["status"] == 200 and result["chosen"] == "mock-a"
    assert result["rejected"] == [{"model": "mock-dead", "reason": "lacks capability json"}]
    assert result["route"].startswith("default@") and result["route"].endswith(":tools")
    assert result["data_class"] == "internal" and result["policy"] == result["route"].rsplit(":", 1)[0]
    assert [r["verdict"] for r in result["candidates"]] == ["chosen", "rejected"]
    secret = httpx.post(f"{gw.url}/admin/explain", headers=ADMIN, json={
        "tenant": "team", "model": "mock-b", "body": {"messages": say(f"{AWS_KEY}")}}).json()
    assert secret["outcome"] == "model_not_allowed" and secret["status"] == 403
    assert secret["sensitive_findings"] == ["AWS_KEY"] and AWS_KEY not in json.dumps(secret)
    tenant = httpx.post(f"{gw.url}/admin/explain", json={"tenant": "team", "model": "x"},
                        headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert tenant.status_code == 401
    bad = httpx.post(f"{gw.url}/admin/explain", headers=ADMIN, json={"tenant": "nobody", "model": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tenant"


# --- shadow traffic --------------------------------------------------------------------------------------


def test_shadow_copy_is_sent_after_the_answer_booked_apart_and_audited(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    shadowed = {"name": "shadowed", "when": {"model": "shadowed"}, "candidates": ["mock-a"],
                "shadow": {"model": "mock-b", "sample": 1.0, "account": "shadow-evals"}}
    gw = start_gateway([policy(shadowed)])
    c = client(gw)
    raw = c.chat.completions.with_raw_response.create(model="shadowed", messages=say("hi"))
    assert raw.headers["x-gateway-model"] == "mock-a"
    request_id = raw.headers["x-request-id"]
    shadow = record_for(gw, f"{request_id}:shadow")
    assert shadow["model_served"] == "mock-b" and shadow["outcome"] == "ok"
    assert shadow["features"] == {"shadow": True, "shadow_of": request_id, "account": "shadow-evals"}
    assert shadow["output_tokens"] > 0 and Decimal(shadow["cost_usd"]) > 0
    assert record_for(gw, request_id)["features"]["shadow_model"] == "mock-b"
    assert [a["model"] for a in upstream.attempts()] == ["up-a", "up-b"]
    rows = wait_for(lambda: len(ledger_rows(gw)) == 2 and ledger_rows(gw))
    assert {r[0]: r[1] for r in rows} == {request_id: "mock-a", f"{request_id}:shadow": "mock-b"}
    import sqlite3

    conn = sqlite3.connect(gw.runtime.db_path)
    tenants = dict(conn.execute("SELECT model, tenant FROM ledger_entries").fetchall())
    conn.close()
    assert tenants == {"mock-a": "team", "mock-b": "shadow-evals"}  # never the tenant's budget

    upstream.reset()
    list(c.chat.completions.create(model="shadowed", messages=say("hi"), stream=True))
    wait_for(lambda: len(upstream.attempts()) == 2)
    copy = upstream.attempts()[1]
    assert copy["model"] == "up-b" and not copy["body"].get("stream")  # measured, never relayed

    upstream.reset()
    c.chat.completions.create(model="shadowed", messages=say("hi"), extra_headers={"x-gateway-data-class": "confidential"})
    c.chat.completions.create(model="shadowed", messages=say(f"my key {AWS_KEY}"))
    assert gw.runtime.shadow.in_flight == 0
    assert [a["model"] for a in upstream.attempts()] == ["up-a", "up-a"]  # confidential: never mirrored to a vendor


def test_scan_reads_anthropic_messages_too(
        start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> None:
    import anthropic

    gw = start_gateway([policy(SENSITIVE_LOCAL)])
    claude = anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0)
    raw = claude.messages.with_raw_response.create(
        model="mock-b", max_tokens=20, system=f"deploy key: {AWS_KEY}",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert raw.parse().content
    assert raw.headers["x-gateway-model"] == "mock-a"
    record = record_for(gw, raw.headers["x-request-id"])
    assert record["features"]["sensitive_findings"] == ["AWS_KEY"]
    assert [a["model"] for a in upstream.attempts()] == ["up-a"]


def test_split_sticky_per_user_field(start_gateway: Callable[..., RunningGateway]) -> None:
    canary = {"name": "canary", "when": {"model": "canary"}, "candidates": ["mock-a", "mock-b"], "sticky": "user",
              "split": [{"model": "mock-a", "weight": 50}, {"model": "mock-b", "weight": 50}]}
    gw = start_gateway([policy(canary)])
    c = client(gw)

    def arm(user: str) -> str:
        raw = c.chat.completions.with_raw_response.create(model="canary", messages=say("hi"), user=user)
        return raw.headers["x-gateway-model"]

    first = {user: arm(user) for user in (f"user-{i}" for i in range(12))}
    assert set(first.values()) == {"mock-a", "mock-b"}
    assert {user: arm(user) for user in first} == first  # each user keeps its arm
    records = wait_for(lambda: len(rs := [r for r in audit_rows(gw) if r.get("model_requested") == "canary"]) == 24
                       and rs)
    assert len({r["features"]["sticky_user"] for r in records}) == 12  # a pseudonym per user, not the id
    assert "user-0" not in json.dumps(audit_rows(gw))
