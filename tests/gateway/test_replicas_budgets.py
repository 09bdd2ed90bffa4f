"""Budget rules end to end, on every state backend (sqlite; postgresql; redis + postgresql)."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import psycopg
import pytest

from budgets import Price, cost
from gateway.parsing import parse_chat
from tests.harness import (
    ADMIN_KEY,
    OTHER_KEY,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
)
from tests.services import REDIS_URL, pg_schema, redis_prefix

BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend(request: pytest.FixtureRequest, gw_config: dict[str, Any]) -> Iterator[str]:
    with ExitStack() as stack:
        if request.param != "sqlite":
            gw_config["state"] = {"database_url": stack.enter_context(pg_schema())}
        if request.param == "redis":
            gw_config["state"].update(redis_url=REDIS_URL, redis_key_prefix=stack.enter_context(redis_prefix()))
        yield str(request.param)


def _client(gw: RunningGateway, key: str = TENANT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def test_no_budget_never_yields_budget_exceeded(
        backend: str, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["tenants"][1]["allowed_models"] = ["*"]  # "narrow": no budgets, no rate limits
    gw = start_gateway()
    narrow = _client(gw, OTHER_KEY)
    for _ in range(25):
        assert narrow.chat.completions.create(model="mock-a", **BODY).choices


def test_zero_price_model_passes_a_usd_budget_until_a_token_budget_stops_it(
        backend: str, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["models"].append({"name": "mock-free", "provider": "primary", "upstream_model": "up-free",
                                "input_usd_per_mtok": 0, "output_usd_per_mtok": 0, "max_output_tokens": 64,
                                "data_boundary": "local"})
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_usd": 0}, {"window": "day", "max_tokens": 120}]
    gw = start_gateway()
    team = _client(gw)
    with pytest.raises(openai.RateLimitError) as priced:
        team.chat.completions.create(model="mock-a", **BODY)
    assert priced.value.code == "budget_exceeded"
    assert priced.value.response.headers["x-should-retry"] == "false"
    served = 0
    with pytest.raises(openai.RateLimitError) as stopped:
        for _ in range(20):  # free under the $0 budget, until the 120-token budget is used up
            team.chat.completions.create(model="mock-free", **BODY)
            served += 1
    assert served >= 2
    assert stopped.value.code == "budget_exceeded"


def _ledger(gw: RunningGateway) -> list[tuple[Any, ...]]:
    """(request_id, attempt, cost_usd) of every ledger row, on whichever backend the gateway uses."""
    sql = "SELECT request_id, attempt, cost_usd FROM ledger_entries"
    path = gw.runtime.loaded.sqlite_path
    if path is not None:
        with closing(sqlite3.connect(path)) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(gw.runtime.loaded.config.state.database_url) as conn:
        return conn.execute(sql).fetchall()


async def _same_id_burst(gw: RunningGateway, n: int, client_id: str) -> list[httpx.Response]:
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-request-id": client_id}
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(http.post(f"{gw.v1}/chat/completions", json={"model": "mock-a", **BODY},
                                                headers=headers) for _ in range(n)))


def _wait_rows(gw: RunningGateway, count: int) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 10
    while len(rows := _ledger(gw)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def test_a_repeated_client_request_id_never_bypasses_the_budget(
        backend: str, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
        upstream: UpstreamProcess) -> None:
    """The ledger key is the gateway's own id: a tenant reusing one x-request-id cannot make its
    rows collide (and be dropped as replays), so every served request is booked."""
    worst = cost(Price(Decimal(1), Decimal(2)), parse_chat(orjson.dumps({"model": "mock-a", **BODY})).input_tokens_bound,
                 BODY["max_tokens"])
    budget = 3 * worst
    gw_config["tenants"][0].update(budgets=[{"window": "day", "max_usd": str(budget)}], rate_limits={})
    gw = start_gateway()
    upstream.script(*({"delay_ms": 800} for _ in range(10)))  # the 10 overlap: exactly 3 fit
    answers = asyncio.run(_same_id_burst(gw, 10, "same-id"))
    ok = [a for a in answers if a.status_code == 200]
    assert len(ok) == 3 and all(a.json()["error"]["code"] == "budget_exceeded"
                                for a in answers if a.status_code != 200)
    assert {a.headers["x-request-id"] for a in answers} == {"same-id"}  # the client's id is echoed
    rows = _wait_rows(gw, 3)
    assert len(rows) == 3 and {r[1] for r in rows} == {1}
    assert {r[0] for r in rows} == {a.headers["x-gateway-request-id"] for a in ok}  # 3 distinct keys
    # One after another, the same id again: each one served is booked, until the budget refuses.
    served = len(ok)
    for _ in range(40):
        answer = httpx.post(f"{gw.v1}/chat/completions", json={"model": "mock-a", **BODY}, timeout=30,
                            headers={"authorization": f"Bearer {TENANT_KEY}", "x-request-id": "same-id"})
        if answer.status_code != 200:
            assert answer.status_code == 429 and answer.json()["error"]["code"] == "budget_exceeded"
            break
        served += 1
        assert len(_wait_rows(gw, served)) == served
    else:
        raise AssertionError("40 requests reusing one x-request-id were all served: the budget was bypassed")
    rows = _ledger(gw)
    assert len(rows) == served and len({r[0] for r in rows}) == served
    assert sum((Decimal(r[2]) for r in rows), Decimal(0)) <= budget
    audit = httpx.get(f"{gw.url}/admin/audit", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
    served_records = [r for r in audit["data"] if r.get("kind") == "request" and r["status"] == 200]
    assert {r["client_request_id"] for r in served_records} == {"same-id"}
    assert {r["request_id"] for r in served_records} == {r[0] for r in rows}  # audit joins the ledger


def _worst_usd(body: dict[str, Any], out: int) -> Decimal:
    """What mock-a ($1/$2 per Mtok) costs at most for ``body`` with ``out`` output tokens."""
    return cost(Price(Decimal(1), Decimal(2)), parse_chat(orjson.dumps(body)).input_tokens_bound, out)


def test_the_worst_case_counts_every_choice_and_the_larger_output_cap(
        backend: str, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
        upstream: UpstreamProcess) -> None:
    one = {"model": "mock-a", **BODY}  # one choice of at most 16 tokens
    budget = _worst_usd(one, 16) * Decimal("1.5")
    gw_config["tenants"][0].update(budgets=[{"window": "day", "max_usd": str(budget)}], rate_limits={})
    gw = start_gateway()
    headers = {"authorization": f"Bearer {TENANT_KEY}"}
    for too_big in ({**one, "n": 2},  # two choices: twice the output
                    {**one, "max_completion_tokens": 16, "max_tokens": 64}):  # either cap may be honoured
        refused = httpx.post(f"{gw.v1}/chat/completions", json=too_big, headers=headers, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert upstream.attempts() == []  # refused before any upstream call
    assert httpx.post(f"{gw.v1}/chat/completions", json=one, headers=headers, timeout=30).status_code == 200


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_an_absurd_max_tokens_is_a_400_on_every_backend(
        backend: str, api: str, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
        upstream: UpstreamProcess) -> None:
    gw = start_gateway()
    if api == "openai":
        answer = httpx.post(f"{gw.v1}/chat/completions", json={"model": "mock-a", **BODY, "max_tokens": 10**19},
                            headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"
    else:
        answer = httpx.post(f"{gw.v1}/messages", json={"model": "mock-a", "max_tokens": 10**19, "messages": BODY["messages"]},
                            headers={"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    assert upstream.attempts() == []
