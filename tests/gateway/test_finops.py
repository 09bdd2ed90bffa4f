"""FinOps reports: FOCUS CSV totals equal the ledger, /admin/spend filters, unit economics, burn."""
from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from budgets import BudgetLimit, LedgerEntry, SpendRow, SqliteLedger
from gateway import finops
from gateway.cli import main
from tests.gateway.test_e2e_openai import wait_for
from tests.harness import ADMIN_KEY, OTHER_KEY, TENANT_KEY, RunningGateway

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TODAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
PAST = [TODAY - timedelta(days=3), TODAY - timedelta(days=1)]


def ledger_rows(db: Path) -> list[tuple[str, str, str, int, int, int, Decimal]]:
    conn = sqlite3.connect(db)
    try:
        return [(t, m, ts[:10], i, o, c, Decimal(cost)) for t, m, ts, i, o, c, cost in conn.execute(
            "SELECT tenant, model, ts, input_tokens, output_tokens, cached_input_tokens, cost_usd FROM ledger_entries")]
    finally:
        conn.close()


def _seed_past(db: Path) -> None:
    """Older usage, written through the ledger itself (another day, cached tokens, odd costs)."""
    entries = [LedgerEntry(request_id=f"seed-{i}", attempt=1, ts=ts, tenant=tenant, key_id=None, model=model,
                           provider="primary" if model == "mock-a" else "hosted", input_tokens=1000 + i,
                           output_tokens=333 + i, cached_input_tokens=100 * i, cost_usd=Decimal("0.001234567") * (i + 1),
                           usage_estimated=False, status="ok")
               for i, (ts, tenant, model) in enumerate(
                   [(PAST[0], "team", "mock-a"), (PAST[0], "team", "mock-b"), (PAST[1], "narrow", "mock-a"),
                    (PAST[1], "team", "mock-a"), (PAST[1], "team", "mock-a")])]

    async def write() -> None:
        ledger = SqliteLedger(str(db))
        await ledger.start()
        await ledger.record(entries)
        await ledger.close()

    asyncio.run(write())


@pytest.fixture
def seeded(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    gw = start_gateway()
    team = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    narrow = openai.OpenAI(base_url=gw.v1, api_key=OTHER_KEY, max_retries=0)
    for model in ("mock-a", "mock-a", "mock-b"):
        team.chat.completions.create(model=model, messages=[{"role": "user", "content": "price this please"}])
    narrow.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "and this"}])
    wait_for(lambda: len(ledger_rows(gw.runtime.db_path)) == 4)
    _seed_past(gw.runtime.db_path)
    return gw


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_focus_csv_rows_and_totals_equal_the_ledger(seeded: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli(capsys, "spend", "--config", str(seeded.config_path), "--by", "tenant,model,day", "--format", "csv")
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == finops.FOCUS_COLUMNS
    rows = list(reader)
    ledger = ledger_rows(seeded.runtime.db_path)
    assert sum(Decimal(r["BilledCost"]) for r in rows) == sum(r[6] for r in ledger)  # to the nano-dollar
    keys = [(r["SubAccountId"], r["ResourceId"], r["ChargePeriodStart"], r["x_TokenType"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per tenant x model x day x token type
    want: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
    for tenant, model, day, i, o, c, cost in ledger:
        acc = want[(tenant, model, day)]
        acc[0], acc[1], acc[2], acc[3] = acc[0] + i, acc[1] + o, acc[2] + c, acc[3] + cost
    got: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(lambda: defaultdict(Decimal))
    for r in rows:
        g = got[(r["SubAccountId"], r["ResourceId"], r["ChargePeriodStart"][:10])]
        g[r["x_TokenType"]] += Decimal(r["ConsumedQuantity"])
        g["cost"] += Decimal(r["BilledCost"])
        assert r["BilledCost"] == r["EffectiveCost"] and r["BillingCurrency"] == "USD"
        assert r["ConsumedUnit"] == "Tokens" and r["ServiceCategory"] == "AI and Machine Learning"
        price = {"mock-a": {"input": 1, "cached_input": 1, "output": 2}, "mock-b": {"input": 3, "cached_input": 3,
                                                                                    "output": 6}}
        assert Decimal(r["ListCost"]) == Decimal(r["ConsumedQuantity"]) * price[r["ResourceId"]][r["x_TokenType"]] / \
            Decimal(1_000_000)
        start = datetime.fromisoformat(r["ChargePeriodStart"])
        assert r["ChargePeriodEnd"] == (start + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert set(got) == set(want)
    for key, (i, o, c, cost) in want.items():
        assert (got[key]["input"], got[key]["output"], got[key]["cached_input"]) == (i, o, c)
        assert got[key]["cost"] == cost, key
    assert {r["SubAccountId"] for r in rows} == {"team", "narrow"}
    assert {r["ServiceProviderName"] for r in rows} == {"primary", "OpenAI"}  # openai_compatible keeps its name


def test_admin_spend_equals_cli_and_filters(seeded: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(seeded.config_path)
    since, until = PAST[0].date().isoformat(), TODAY.date().isoformat()
    cli_csv = _cli(capsys, "spend", "--config", cfg, "--format", "csv", "--since", since, "--until", until)
    api_csv = httpx.get(f"{seeded.url}/admin/spend", params={"format": "csv", "since": since, "until": until},
                        headers=ADMIN).text
    assert api_csv == cli_csv
    assert httpx.get(f"{seeded.url}/admin/spend", headers={"authorization": f"Bearer {TENANT_KEY}"}).status_code == 401
    ledger = ledger_rows(seeded.runtime.db_path)
    cases: list[tuple[dict[str, str], Callable[[tuple[Any, ...]], bool]]] = [
        ({}, lambda r: True),
        ({"tenant": "team"}, lambda r: r[0] == "team"),
        ({"model": "mock-b"}, lambda r: r[1] == "mock-b"),
        ({"tenant": "team", "model": "mock-a"}, lambda r: r[0] == "team" and r[1] == "mock-a"),
        ({"since": PAST[1].date().isoformat()}, lambda r: r[2] >= PAST[1].date().isoformat()),
        ({"until": PAST[1].date().isoformat()}, lambda r: r[2] <= PAST[1].date().isoformat()),
        ({"since": PAST[1].date().isoformat(), "until": PAST[1].date().isoformat(), "tenant": "team"},
         lambda r: r[2] == PAST[1].date().isoformat() and r[0] == "team"),
    ]
    for params, keep in cases:
        body = httpx.get(f"{seeded.url}/admin/spend", params=params, headers=ADMIN).json()
        expected = [r for r in ledger if keep(r)]
        assert Decimal(body["totals"]["cost_usd"]) == sum((r[6] for r in expected), Decimal(0)), params
        assert body["totals"]["requests"] == len(expected), params
        assert sum(Decimal(d["cost_usd"]) for d in body["data"]) == Decimal(body["totals"]["cost_usd"])
    by_model = httpx.get(f"{seeded.url}/admin/spend", params={"by": "model"}, headers=ADMIN).json()["data"]
    assert {d["model"] for d in by_model} == {"mock-a", "mock-b"} and "tenant" not in by_model[0]
    assert httpx.get(f"{seeded.url}/admin/spend", params={"by": "colour"}, headers=ADMIN).status_code == 400


def test_unit_economics_and_table(seeded: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    body = httpx.get(f"{seeded.url}/admin/spend", headers=ADMIN).json()
    ledger = ledger_rows(seeded.runtime.db_path)
    for unit in body["unit_economics"]:
        mine = [r for r in ledger if (r[0], r[1]) == (unit["tenant"], unit["model"])]
        cost = sum((r[6] for r in mine), Decimal(0))
        tokens = sum(r[3] + r[4] + r[5] for r in mine)
        assert unit["requests"] == len(mine) and unit["tokens"] == tokens
        assert Decimal(unit["cost_per_1k_requests_usd"]) == (cost * 1000 / len(mine)).quantize(Decimal("1e-9"))
        assert Decimal(unit["tokens_per_request"]) == (Decimal(tokens) / len(mine)).quantize(Decimal("0.1"))
    burn = {(b["tenant"], b["window"], b["kind"]): b for b in body["budget_burn"]}
    today = [r for r in ledger if r[0] == "team" and r[2] == TODAY.date().isoformat()]
    assert Decimal(burn[("team", "day", "usd")]["spent"]) == sum((r[6] for r in today), Decimal(0))
    assert burn[("team", "day", "usd")]["limit"] == "100.000000000"
    out = _cli(capsys, "spend", "--config", str(seeded.config_path))
    assert "unit economics" in out and "cost_per_1k_requests_usd" in out and "budget burn" in out


class _FixedLedger:
    """Spend totals by `since`, for checking the burn arithmetic without a database."""

    def __init__(self, by_since: dict[datetime | None, tuple[str, int]]) -> None:
        self.by_since = by_since

    async def spend(self, since: datetime | None, until: datetime | None, tenant: str | None,
                    group_by: Sequence[str]) -> list[SpendRow]:
        usd, tokens = self.by_since[since]
        return [SpendRow({}, 1, tokens, 0, 0, Decimal(usd))]


@pytest.mark.parametrize("now, window, spent, cap, exhausts, within", [
    # Day, half way through: $40 of $100 -> $80/day, $60 left -> 18 h -> tomorrow 06:00.
    (datetime(2026, 11, 25, 12, tzinfo=UTC), "day", "40", 100, "2026-11-26", False),
    # Month, 9 days in: $50 of $100 -> 50/9 a day -> 9 more days -> the 19th, inside the month.
    (datetime(2026, 11, 10, tzinfo=UTC), "month", "50", 100, "2026-11-19", True),
    # Already over: exhausted now.
    (datetime(2026, 11, 10, tzinfo=UTC), "month", "120", 100, "2026-11-10", True),
    # Nothing spent: no forecast.
    (datetime(2026, 11, 10, tzinfo=UTC), "month", "0", 100, None, False),
])
def test_budget_burn_forecast(now: datetime, window: str, spent: str, cap: int, exhausts: str | None,
                              within: bool) -> None:
    from budgets import window_start

    ledger = _FixedLedger({window_start(window, now): (spent, 0)})
    burn = asyncio.run(finops.budget_burn(ledger, {"t": (BudgetLimit(window, max_usd=Decimal(cap)),)}, now))  # type: ignore[arg-type]
    assert len(burn) == 1 and burn[0]["kind"] == "usd"
    assert burn[0]["exhausts_on"] == exhausts and burn[0]["exhausts_within_window"] is within
    assert Decimal(burn[0]["remaining"]) == max(Decimal(cap) - Decimal(spent), Decimal(0))


def test_split_adds_up_exactly() -> None:
    parts = finops._split(Decimal("0.000000010"), [Decimal(1), Decimal(1), Decimal(1)])
    assert sum(parts) == Decimal("0.000000010") and all(p >= 0 for p in parts)
    assert finops._split(Decimal(5), [Decimal(0), Decimal(0)]) == [Decimal(5), Decimal(0)]
