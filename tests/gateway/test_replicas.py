"""Several real gateway processes sharing PostgreSQL and Redis (issue 5): budgets are never
overshot, limits hold across replicas, abandoned reservations expire at their worst case."""
from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from budgets import Price, cost
from gateway.parsing import parse_chat
from tests.gatewayprocs import Cluster, cluster
from tests.harness import TENANT_KEY, UpstreamProcess

BODY: dict[str, Any] = {"model": "mock-a", "messages": [{"role": "user", "content": "hello budget"}]}
MOCK_A = Price(input_usd_per_mtok=Decimal(1), output_usd_per_mtok=Decimal(2))


def worst_case_usd(body: dict[str, Any], max_output: int = 256) -> Decimal:
    """What the gateway reserves for ``body`` on mock-a: input upper bound + the model's cap."""
    bound = parse_chat(orjson.dumps(body)).input_tokens_bound
    return cost(MOCK_A, bound, max_output)


def set_tenant(config: dict[str, Any], **fields: Any) -> None:
    team = config["tenants"][0]
    team.update(fields)


def wait_until(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def ledger(c: Cluster) -> list[tuple[Any, ...]]:
    return c.query("SELECT request_id, attempt, input_tokens, output_tokens, cost_usd, status, usage_estimated,"
                   " price_version FROM ledger_entries ORDER BY recorded_at")


async def _burst(urls: list[str], n: int, body: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {TENANT_KEY}"})
            for i in range(n)))


def test_fifty_requests_three_processes_budget_of_three(tmp_path: Path, upstream: UpstreamProcess) -> None:
    budget = 3 * worst_case_usd(BODY)
    with cluster(upstream.url, tmp_path, 3, edit=lambda c: set_tenant(
            c, budgets=[{"window": "day", "max_usd": str(budget)}], rate_limits={})) as c:
        upstream.script(*({"delay_ms": 800} for _ in range(50)))  # all 50 overlap the 3 admitted
        answers = asyncio.run(_burst([n.v1 for n in c.nodes], 50, BODY))
        ok = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code != 200]
        assert len(ok) == 3 and len(refused) == 47
        for answer in refused:
            assert answer.status_code == 429
            assert answer.json()["error"]["code"] == "budget_exceeded"
            assert answer.headers["x-should-retry"] == "false"
        assert len([a for a in upstream.attempts() if a["path"] == "/v1/chat/completions"]) == 3
        rows = wait_until(lambda: (r := ledger(c)) and len(r) == 3 and r)
        spent = sum((Decimal(r[4]) for r in rows), Decimal(0))
        assert 0 < spent <= budget
        assert {r[0] for r in rows} == {a.headers["x-request-id"] for a in ok}
        assert all(r[7].startswith("config:") for r in rows)  # the price version of every row


async def _mixed_burst(urls: list[str], n: int) -> list[tuple[str, httpx.Response]]:
    """n requests round-robin over the replicas, alternating the OpenAI and Anthropic formats."""
    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, httpx.Response]:
        url = urls[i % len(urls)]
        if i % 2:
            return "anthropic", await http.post(
                f"{url}/messages", headers={"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"},
                json={"model": "mock-a", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
        return "openai", await http.post(f"{url}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                                         json={**BODY, "max_tokens": 16})

    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(one(http, i) for i in range(n)))


def test_sixty_rpm_shared_by_three_replicas_admits_sixty_on_both_formats(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    with cluster(upstream.url, tmp_path, 3, edit=lambda c: set_tenant(
            c, budgets=[], rate_limits={"requests_per_minute": 60})) as c:
        answers = asyncio.run(_mixed_burst([n.v1 for n in c.nodes], 120))
        ok = [(api, a) for api, a in answers if a.status_code == 200]
        refused = [(api, a) for api, a in answers if a.status_code != 200]
        assert len(ok) == 60 and len(refused) == 60
        assert {api for api, _ in ok} == {api for api, _ in refused} == {"openai", "anthropic"}
        for _, answer in ok:
            assert answer.headers["x-ratelimit-limit-requests"] == "60"
            assert 0 <= int(answer.headers["x-ratelimit-remaining-requests"]) < 60
            assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
        for api, answer in refused:
            assert answer.status_code == 429
            assert 1 <= int(answer.headers["retry-after"]) <= 60
            assert answer.headers["x-ratelimit-remaining-requests"] == "0"
            if api == "openai":
                assert answer.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert answer.json() == {"type": "error", "error": {
                    "type": "rate_limit_error", "message": answer.json()["error"]["message"]}}
        assert len(upstream.attempts()) == 60


def test_tokens_per_minute_counts_the_estimate_then_the_actual_usage(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    body = {**BODY, "max_tokens": 200}
    estimate = parse_chat(orjson.dumps(body)).input_tokens_bound + 200
    tpm = 2 * estimate - 1  # two estimates never fit at once; an estimate after an actual does
    with cluster(upstream.url, tmp_path, 2, edit=lambda c: set_tenant(
            c, budgets=[], rate_limits={"tokens_per_minute": tpm})) as c:
        first_client, second_client = (openai.OpenAI(base_url=n.v1, api_key=TENANT_KEY, max_retries=0)
                                       for n in c.nodes)
        first = first_client.chat.completions.with_raw_response.create(**body)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(tpm - estimate)
        usage = first.parse().usage
        assert usage is not None
        actual = usage.prompt_tokens + usage.completion_tokens
        # On the other replica: the first request now counts its actual tokens, not its estimate.
        second = wait_until(lambda: _try(second_client, body))
        assert second.headers["x-ratelimit-remaining-tokens"] == str(tpm - actual - estimate)
        # Two at once on two replicas: both estimates are counted at admission, one is refused.
        upstream.script({"delay_ms": 1000}, {"delay_ms": 1000})
        answers = asyncio.run(_burst([n.v1 for n in c.nodes], 2, body))
        assert sorted(a.status_code for a in answers) == [200, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-limit-tokens"] == str(tpm)


def _try(client: openai.OpenAI, body: dict[str, Any]) -> Any:
    try:
        return client.chat.completions.with_raw_response.create(**body)
    except openai.RateLimitError:
        return None


def test_killed_process_reservation_is_booked_at_worst_case_after_ttl(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    worst = worst_case_usd(BODY)
    with cluster(upstream.url, tmp_path, 2, env={"GATEWAY_RESERVATION_TTL_S": "2"}, edit=lambda c: set_tenant(
            c, budgets=[{"window": "day", "max_usd": str(2 * worst)}], rate_limits={})) as c:
        doomed, survivor = c.nodes
        upstream.script({"delay_ms": 60_000})

        async def hang() -> None:
            async with httpx.AsyncClient(timeout=60) as http:
                await http.post(f"{doomed.v1}/chat/completions", json=BODY,
                                headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": "req-killed"})

        async def kill_mid_request() -> None:
            task = asyncio.create_task(hang())
            await asyncio.to_thread(wait_until, lambda: upstream.attempts())  # the upstream call is in flight
            doomed.kill9()
            with pytest.raises(httpx.HTTPError):
                await task

        asyncio.run(kill_mid_request())
        rows = wait_until(lambda: ledger(c))
        assert [(r[1], r[5], r[6]) for r in rows] == [(0, "reservation_expired", True)]
        assert rows[0][0] != "req-killed"  # booked under the gateway's own id, never the client's
        assert Decimal(rows[0][4]) == worst  # the worst case, never less
        assert c.query("SELECT count(*) FROM ledger_entries")[0][0] == 1
        # The headroom came back as spend: one more worst case fits, then the budget is spent.
        chat = openai.OpenAI(base_url=survivor.v1, api_key=TENANT_KEY, max_retries=0)
        chat.chat.completions.create(**BODY)
        with pytest.raises(openai.RateLimitError) as refused:
            chat.chat.completions.create(**BODY)
        assert refused.value.code == "budget_exceeded"
        assert "booked abandoned reservations at their worst case" in survivor.log()
