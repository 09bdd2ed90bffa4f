"""Behaviour every ``Ledger`` implementation must have. Add a backend to ``LEDGERS``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from budgets import (
    BudgetExceeded,
    BudgetLimit,
    Ledger,
    Price,
    PriceVersion,
    SqliteLedger,
    cost,
    price_version,
)
from tests.budgets.backends import BACKENDS, started
from tests.budgets.factories import NOW, entry

D = Decimal


@pytest.fixture(params=BACKENDS)
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Ledger]:
    async with started(request.param, tmp_path) as instance:
        yield instance


DAY_TOKENS = [BudgetLimit("day", max_tokens=1000)]
MONTH_USD = [BudgetLimit("month", max_usd=D("1.00"))]


def test_sqlite_ledger_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(SqliteLedger(str(tmp_path / "x.db")), Ledger)


async def test_every_backend_satisfies_the_protocol(ledger: Ledger) -> None:
    assert isinstance(ledger, Ledger)
    await ledger.check()


async def test_reserve_then_settle_moves_the_hold_to_spend(ledger: Ledger) -> None:
    limits = [BudgetLimit("day", max_tokens=1000, max_usd=D("1"))]
    res = await ledger.reserve("t", limits, 300, D("0.30"), NOW)
    assert res.tenant == "t" and res.tokens == 300 and res.usd == D("0.30")
    assert res.window_keys == ("day:2026-11-25",)
    [bal] = await ledger.balance("t", limits, NOW)
    assert (bal.spent_tokens, bal.reserved_tokens, bal.remaining_tokens) == (
        0,
        300,
        700,
    )
    assert (bal.spent_usd, bal.reserved_usd, bal.remaining_usd) == (
        D(0),
        D("0.30"),
        D("0.70"),
    )

    actual = entry(
        "r1",
        tenant="t",
        input_tokens=120,
        cached_input_tokens=30,
        output_tokens=100,
        cost_usd="0.1234567891",
    )
    await ledger.settle(res, [actual])
    [bal] = await ledger.balance("t", limits, NOW)
    assert (bal.spent_tokens, bal.reserved_tokens, bal.remaining_tokens) == (
        250,
        0,
        750,
    )
    assert bal.spent_usd == D("0.1234567891")
    assert bal.reserved_usd == 0
    assert bal.remaining_usd == D("0.8765432109")


async def test_release_spends_nothing(ledger: Ledger) -> None:
    res = await ledger.reserve("t", DAY_TOKENS, 900, D("0"), NOW)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("t", DAY_TOKENS, 200, D("0"), NOW)
    await ledger.release(res)
    [bal] = await ledger.balance("t", DAY_TOKENS, NOW)
    assert (bal.spent_tokens, bal.reserved_tokens) == (0, 0)
    await ledger.release(res)  # twice is harmless
    await ledger.reserve("t", DAY_TOKENS, 1000, D("0"), NOW)


async def test_token_cap_rejects_only_when_strictly_over(ledger: Ledger) -> None:
    limits = [BudgetLimit("day", max_tokens=2_000_000)]
    await ledger.record(
        [entry("r1", tenant="t", input_tokens=1_500_000, output_tokens=0)]
    )
    await ledger.reserve(
        "t", limits, 500_000, D("0"), NOW
    )  # exactly at the cap: allowed
    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve("t", limits, 1, D("0"), NOW)
    err = caught.value
    assert (err.window, err.kind, err.limit, err.used) == (
        "day",
        "tokens",
        2_000_000,
        2_000_000,
    )
    assert str(err) == "day token budget exhausted (2000000 tokens)"


async def test_usd_cap_rejects_and_allows_free_requests(ledger: Ledger) -> None:
    await ledger.record([entry("r1", tenant="t", cost_usd="0.75")])
    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve("t", MONTH_USD, 0, D("0.2500000001"), NOW)
    assert (caught.value.kind, caught.value.window) == ("usd", "month")
    assert caught.value.limit == D("1.00") and caught.value.used == D("0.75")
    assert str(caught.value) == "month USD budget exhausted (1.00 USD)"
    await ledger.reserve("t", MONTH_USD, 0, D("0.25"), NOW)  # now exactly exhausted
    await ledger.reserve("t", MONTH_USD, 10, D("0"), NOW)  # a $0 request still fits


async def test_each_window_is_checked_and_resets_at_its_boundary(
    ledger: Ledger,
) -> None:
    limits = [BudgetLimit("day", max_tokens=100), BudgetLimit("month", max_tokens=250)]
    for day in range(2):
        now = NOW + timedelta(days=day)
        res = await ledger.reserve("t", limits, 100, D("0"), now)
        assert res.window_keys == (f"day:2026-11-{25 + day}", "month:2026-11")
        with pytest.raises(BudgetExceeded) as caught:
            await ledger.reserve("t", limits, 1, D("0"), now)
        assert caught.value.window == "day"
        await ledger.settle(
            res,
            [entry(f"r{day}", tenant="t", ts=now, input_tokens=100, output_tokens=0)],
        )
    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve("t", limits, 51, D("0"), NOW + timedelta(days=2))
    assert caught.value.window == "month"
    december = NOW.replace(month=12, day=1)
    await ledger.reserve("t", limits, 100, D("0"), december)


async def test_no_caps_never_reject(ledger: Ledger) -> None:
    for limits in ([], [BudgetLimit("day")], [BudgetLimit("total", None, None)]):
        res = await ledger.reserve("t", limits, 10**12, D("1e9"), NOW)
        await ledger.release(res)
    res = await ledger.reserve("t", [BudgetLimit("day")], 5, D("1"), NOW)
    assert res.window_keys == ()


async def test_tenants_are_independent(ledger: Ledger) -> None:
    await ledger.reserve("a", DAY_TOKENS, 1000, D("0"), NOW)
    await ledger.reserve("b", DAY_TOKENS, 1000, D("0"), NOW)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("a", DAY_TOKENS, 1, D("0"), NOW)


@pytest.mark.parametrize(
    ("limits", "tokens", "usd"),
    [
        ([BudgetLimit("day", max_tokens=37 * 25)], 25, D("0")),
        ([BudgetLimit("month", max_usd=D("0.37"))], 0, D("0.01")),
        (
            [
                BudgetLimit("minute", max_tokens=10**9),
                BudgetLimit("total", max_usd=D("3.7")),
            ],
            1,
            D("0.1"),
        ),
    ],
)
async def test_concurrent_reservations_never_overshoot(
    ledger: Ledger, limits: list[BudgetLimit], tokens: int, usd: Decimal
) -> None:
    results = await asyncio.gather(
        *(ledger.reserve("t", limits, tokens, usd, NOW) for _ in range(200)),
        return_exceptions=True,
    )
    granted = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, BaseException)]
    assert len(granted) == 37
    assert all(isinstance(r, BudgetExceeded) for r in rejected)
    assert len({r.id for r in granted}) == 37


async def test_settle_is_idempotent_per_request_and_attempt(ledger: Ledger) -> None:
    res = await ledger.reserve("t", DAY_TOKENS, 200, D("0"), NOW)
    rows = [entry("r1", tenant="t", attempt=0), entry("r1", tenant="t", attempt=1)]
    await ledger.settle(res, rows)
    await ledger.settle(res, rows)  # the same settle replayed
    again = await ledger.reserve("t", DAY_TOKENS, 10, D("0"), NOW)
    await ledger.settle(again, [rows[1]])  # a replayed entry under another reservation
    await ledger.record(rows)
    [bal] = await ledger.balance("t", DAY_TOKENS, NOW)
    assert (bal.spent_tokens, bal.reserved_tokens) == (300, 0)
    [total] = await ledger.spend(None, None, "t", [])
    assert (total.requests, total.input_tokens, total.cost_usd) == (1, 200, D("0.0002"))


async def test_recorded_usage_counts_toward_balances(ledger: Ledger) -> None:
    limits = [BudgetLimit("day", max_tokens=1000), BudgetLimit("total", max_usd=D("5"))]
    await ledger.balance("t", limits, NOW)
    await ledger.record(
        [
            entry("r1", tenant="t", cost_usd="1.5"),
            entry("r2", tenant="t", ts=NOW - timedelta(days=3), cost_usd="2"),
        ]
    )
    day, total = await ledger.balance("t", limits, NOW)
    assert (day.window_key, day.spent_tokens, day.spent_usd) == (
        "day:2026-11-25",
        150,
        D("1.5"),
    )
    assert (total.window_key, total.spent_tokens, total.spent_usd) == (
        "total",
        300,
        D("3.5"),
    )


async def test_negative_amounts_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError):
        await ledger.reserve("t", DAY_TOKENS, -1, D("0"), NOW)
    with pytest.raises(ValueError):
        await ledger.reserve("t", MONTH_USD, 0, D("-0.01"), NOW)


async def test_spend_groups_and_filters(ledger: Ledger) -> None:
    day2 = NOW + timedelta(days=1)
    await ledger.record(
        [
            entry(
                "a1",
                tenant="a",
                model="m1",
                cost_usd="0.10",
                input_tokens=10,
                output_tokens=1,
            ),
            entry(
                "a1",
                attempt=1,
                tenant="a",
                model="m2",
                cost_usd="0.20",
                input_tokens=20,
                output_tokens=2,
            ),
            entry(
                "a2",
                tenant="a",
                model="m1",
                ts=day2,
                cost_usd="0.0000000004",
                cached_input_tokens=7,
            ),
            entry("b1", tenant="b", model="m1", cost_usd="1.01"),
        ]
    )
    by_tenant = await ledger.spend(None, None, None, ["tenant"])
    assert [(r.group, r.requests, r.cost_usd) for r in by_tenant] == [
        ({"tenant": "a"}, 2, D("0.300000000")),
        ({"tenant": "b"}, 1, D("1.01")),
    ]
    rows = await ledger.spend(None, None, "a", ["model", "day"])
    assert [
        (r.group, r.requests, r.input_tokens, r.output_tokens, r.cached_input_tokens)
        for r in rows
    ] == [
        ({"model": "m1", "day": "2026-11-25"}, 1, 10, 1, 0),
        ({"model": "m1", "day": "2026-11-26"}, 1, 100, 50, 7),
        ({"model": "m2", "day": "2026-11-25"}, 1, 20, 2, 0),
    ]
    assert rows[1].cost_usd == D("0.0000000004").quantize(
        D("1e-9")
    )  # nano-USD resolution
    [only_day2] = await ledger.spend(day2.replace(hour=0), None, None, [])
    assert (only_day2.requests, only_day2.cached_input_tokens) == (1, 7)
    [before_day2] = await ledger.spend(None, day2.replace(hour=0), None, ["day"])
    assert before_day2.group == {"day": "2026-11-25"}
    assert before_day2.cost_usd == D("1.31")
    [empty] = await ledger.spend(None, None, "nobody", [])
    assert (empty.group, empty.requests, empty.cost_usd) == ({}, 0, D(0))
    with pytest.raises(ValueError, match="cannot group spend"):
        await ledger.spend(None, None, None, ["provider"])


def test_budget_limits_are_validated_and_exact() -> None:
    assert BudgetLimit("month", max_usd=500).max_usd == D("500")  # type: ignore[arg-type]
    assert BudgetLimit("day", max_usd=0.1).max_usd == D("0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown budget window"):
        BudgetLimit("week", max_tokens=1)
    with pytest.raises(ValueError):
        BudgetLimit("day", max_tokens=-1)
    with pytest.raises(ValueError):
        BudgetLimit("day", max_usd=D("-0.01"))


@pytest.mark.parametrize(
    ("window", "last_instant", "next_start"),
    [
        ("minute", NOW.replace(second=59, microsecond=999_999), NOW.replace(minute=6, second=0)),
        ("hour", NOW.replace(minute=59, second=59, microsecond=999_999), NOW.replace(hour=14, minute=0, second=0)),
        ("day", NOW.replace(hour=23, minute=59, second=59, microsecond=999_999),
         NOW.replace(day=26, hour=0, minute=0, second=0)),
        ("month", NOW.replace(day=30, hour=23, minute=59, second=59, microsecond=999_999),
         NOW.replace(month=12, day=1, hour=0, minute=0, second=0)),
    ],
)
async def test_calendar_windows_reset_at_the_utc_boundary_and_book_by_start_time(
    ledger: Ledger, window: str, last_instant: datetime, next_start: datetime
) -> None:
    limits = [BudgetLimit(window, max_tokens=100)]
    res = await ledger.reserve("t", limits, 100, D("0"), last_instant)  # starts in the old period
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("t", limits, 1, D("0"), last_instant)
    # Settled after the boundary, the row is booked at the request's start: the old period.
    await ledger.settle(res, [entry("r1", tenant="t", ts=last_instant, input_tokens=60, output_tokens=0)])
    [old] = await ledger.balance("t", limits, last_instant)
    [new] = await ledger.balance("t", limits, next_start)
    assert (old.spent_tokens, new.spent_tokens, new.remaining_tokens) == (60, 0, 100)
    await ledger.reserve("t", limits, 100, D("0"), next_start)  # a full budget again


async def test_total_window_never_resets(ledger: Ledger) -> None:
    limits = [BudgetLimit("total", max_usd=D("1"))]
    await ledger.record([entry("r1", tenant="t", ts=NOW.replace(year=2020), cost_usd="0.6")])
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("t", limits, 0, D("0.5"), NOW)
    await ledger.reserve("t", limits, 0, D("0.4"), NOW.replace(year=2030))


async def test_two_caps_on_one_window_hold_and_release_once(ledger: Ledger) -> None:
    limits = [BudgetLimit("day", max_usd=D("1")), BudgetLimit("day", max_tokens=100)]
    for i in range(3):
        res = await ledger.reserve("t", limits, 30, D("0.1"), NOW)
        await ledger.settle(res, [entry(f"r{i}", tenant="t", input_tokens=20, output_tokens=0, cost_usd="0.05")])
    usd, tokens = await ledger.balance("t", limits, NOW)
    assert (tokens.spent_tokens, tokens.reserved_tokens, usd.reserved_usd) == (60, 0, D(0))
    await ledger.reserve("t", limits, 40, D("0.1"), NOW)
    with pytest.raises(BudgetExceeded) as caught:
        await ledger.reserve("t", limits, 1, D("0"), NOW)
    assert caught.value.kind == "tokens"


#: Anthropic's usage object, as a provider reports it: nested numbers and a string field.
RAW_USAGE = {"input_tokens": 100, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000,
             "output_tokens": 50, "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 0},
             "server_tool_use": {"web_search_requests": 1}, "service_tier": "standard", "ratio": 0.5}


async def test_cache_writes_and_raw_usage_read_back_exactly(ledger: Ledger) -> None:
    limits = [BudgetLimit("day", max_tokens=10_000)]
    res = await ledger.reserve("t", limits, 2000, D("0.01"), NOW)
    settled = replace(entry("r1", tenant="t", attempt=1, input_tokens=300, cached_input_tokens=1000,
                            output_tokens=50, cost_usd="0.0023500000"),
                      cache_write_tokens=200, usage_raw=RAW_USAGE, price_version="config:abc")
    plain = entry("r1", tenant="t", attempt=2)
    await ledger.settle(res, [settled, plain])
    first, second = await ledger.entries("r1")
    # Numbers only: the string field is dropped, nested objects keep their numbers.
    numbers = {k: v for k, v in RAW_USAGE.items() if k != "service_tier"}
    assert first == replace(settled, usage_raw=numbers)
    assert (first.cache_write_tokens, first.cached_input_tokens, first.usage_raw) == (200, 1000, numbers)
    assert second == plain and (second.cache_write_tokens, second.usage_raw) == (0, None)
    assert await ledger.entries("nobody") == []
    # Cache writes are part of input_tokens: totals count them once.
    [bal] = await ledger.balance("t", limits, NOW)
    assert bal.spent_tokens == 300 + 1000 + 50 + 150
    [total] = await ledger.spend(None, None, "t", [])
    assert (total.input_tokens, total.cached_input_tokens, total.output_tokens) == (400, 1000, 100)
    assert total.cost_usd == D("0.0024500000")


async def test_price_versions_hold_the_rates_of_the_rows(ledger: Ledger) -> None:
    claude = Price(D(3), D(15), D("0.3"), D("3.75"))
    mini = Price(D("0.15"), D("0.6"))
    versions = [PriceVersion(price_version(claude), "claude-a", claude),
                PriceVersion(price_version(mini), "gpt-4o-mini", mini)]
    await ledger.record_prices(versions)
    # Written once per version: a second model with the same rates changes nothing.
    await ledger.record_prices([PriceVersion(price_version(claude), "claude-b", claude)])
    charged = cost(claude, 100, 50, 1000, 200)
    await ledger.record([replace(entry("r1", input_tokens=300, cached_input_tokens=1000, cost_usd=charged),
                                 cache_write_tokens=200, price_version=price_version(claude))])
    stored = {v.version: v for v in await ledger.price_versions()}
    assert sorted(stored) == sorted(v.version for v in versions)
    for v in versions:
        got = stored[v.version]
        assert (got.model, got.price) == (v.model, v.price)
        assert got.first_seen is not None and abs(got.first_seen - datetime.now(UTC)) < timedelta(minutes=5)
    assert stored[price_version(mini)].price.cached_input_usd_per_mtok is None
    # Repricing: a row's version names the rates that reproduce its cost.
    [row] = await ledger.entries("r1")
    rates = stored[row.price_version].price
    fresh = row.input_tokens - row.cache_write_tokens
    assert cost(rates, fresh, row.output_tokens, row.cached_input_tokens, row.cache_write_tokens) == row.cost_usd
