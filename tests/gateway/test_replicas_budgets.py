"""Budget rules end to end, on every state backend (sqlite; postgresql; redis + postgresql)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest

from tests.harness import OTHER_KEY, TENANT_KEY, RunningGateway
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
