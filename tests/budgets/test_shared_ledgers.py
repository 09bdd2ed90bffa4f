"""What only the replica-shared ledgers (PostgreSQL, Redis) promise: several instances on
the same stores act as one ledger; abandoned reservations expire at their worst case;
store outages are spooled and replayed without duplicates."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path

import pytest

from budgets import BudgetExceeded, BudgetLimit, Ledger, RequestRef, StoreUnavailable
from tests.budgets.backends import SHARED, Stores, make, stores
from tests.budgets.factories import NOW, entry
from tests.tcpproxy import proxy_for

D = Decimal
DAY = [BudgetLimit("day", max_tokens=1000, max_usd=D("1"))]


@pytest.fixture(params=SHARED)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def shared() -> Iterator[Stores]:
    with ExitStack() as stack:
        yield stores(stack)


async def _start(*ledgers: Ledger) -> None:
    for ledger in ledgers:
        await ledger.start()


async def _close(*ledgers: Ledger) -> None:
    for ledger in ledgers:
        await ledger.close()


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_three_replicas_never_overshoot_together(backend: str, shared: Stores, tmp_path: Path) -> None:
    replicas = [make(backend, tmp_path / str(i), shared) for i in range(3)]
    await _start(*replicas)
    try:
        limits = [BudgetLimit("month", max_usd=D("0.37"))]
        results = await asyncio.gather(
            *(replicas[i % 3].reserve("t", limits, 5, D("0.01"), NOW) for i in range(120)),
            return_exceptions=True,
        )
        granted = [r for r in results if not isinstance(r, BaseException)]
        assert len(granted) == 37
        assert all(isinstance(r, BudgetExceeded) for r in results if isinstance(r, BaseException))
        # Each replica settles its own: the spend is seen by all of them.
        for i, res in enumerate(granted):
            await replicas[i % 3].settle(res, [entry(f"r{i}", tenant="t", cost_usd="0.005")])
        for replica in replicas:
            await replica.flush()
        for replica in replicas:
            [bal] = await replica.balance("t", limits, NOW)
            assert (bal.spent_usd, bal.reserved_usd) == (D("0.185"), D(0))
        [total] = await replicas[0].spend(None, None, "t", [])
        assert (total.requests, total.cost_usd) == (37, D("0.185"))
    finally:
        await _close(*replicas)


async def test_abandoned_reservation_is_booked_at_worst_case_after_ttl(
    backend: str, shared: Stores, tmp_path: Path
) -> None:
    dead = make(backend, tmp_path / "dead", shared, reservation_ttl_s=0.6)
    alive = make(backend, tmp_path / "alive", shared, reservation_ttl_s=0.6)
    await _start(dead, alive)
    try:
        ref = RequestRef("req-dead", key_id="k1", model="m1", provider="p1")
        await dead.reserve("t", DAY, 400, D("0.4"), NOW, ref=ref)
        kept = await alive.reserve("t", DAY, 100, D("0.1"), NOW, ref=RequestRef("req-alive"))
        await dead.close()  # stops renewing without settling: what kill -9 leaves behind

        async def booked() -> bool:
            [bal] = await alive.balance("t", DAY, NOW)
            return bal.spent_tokens == 400

        await until(booked)
        [bal] = await alive.balance("t", DAY, NOW)
        # Worst case spent, the live replica's reservation (renewed) still held.
        assert (bal.spent_usd, bal.reserved_tokens, bal.reserved_usd) == (D("0.4"), 100, D("0.1"))
        [row] = await alive.spend(None, None, "t", ["model"])
        assert (row.group, row.requests, row.input_tokens, row.cost_usd) == ({"model": "m1"}, 1, 400, D("0.4"))
        await asyncio.sleep(1.0)  # several TTLs: the renewed reservation is not taken
        await alive.settle(kept, [entry("req-alive", attempt=1, tenant="t", input_tokens=50, output_tokens=0,
                                        cost_usd="0.05")])
        [bal] = await alive.balance("t", DAY, NOW)
        assert (bal.spent_tokens, bal.spent_usd, bal.reserved_tokens) == (450, D("0.45"), 0)
    finally:
        await _close(alive)


async def test_outage_fails_closed_spools_and_replays_once(backend: str, shared: Stores, tmp_path: Path) -> None:
    store_url = shared.redis_url if backend == "redis" else shared.pg_url
    with proxy_for(store_url) as proxy:
        routed = dataclasses.replace(
            shared, **({"redis_url": proxy.url_for(store_url)} if backend == "redis"
                       else {"pg_url": proxy.url_for(store_url)}))
        ledger = make(backend, tmp_path, routed)
        await ledger.start()
        try:
            res = await ledger.reserve("t", DAY, 300, D("0.3"), NOW)
            proxy.cut()
            with pytest.raises(StoreUnavailable) as caught:
                await ledger.reserve("t", DAY, 1, D("0"), NOW)
            assert caught.value.store == ("redis" if backend == "redis" else "postgresql")
            with pytest.raises(StoreUnavailable):
                await ledger.check()
            await ledger.settle(res, [entry("r1", attempt=1, tenant="t", input_tokens=120, output_tokens=0,
                                            cost_usd="0.12")])
            await ledger.record([entry("r2", attempt=1, tenant="t", input_tokens=5, output_tokens=0)])
            with pytest.raises(StoreUnavailable):
                await ledger.flush()
            spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl"))
            assert spooled.count(b"\n") == 2 and b'"r1"' in spooled
            proxy.restore()
            await ledger.check()

            async def applied() -> bool:
                return ledger.queued == 0  # type: ignore[attr-defined,no-any-return]

            await until(applied)
            [bal] = await ledger.balance("t", DAY, NOW)
            assert (bal.spent_tokens, bal.reserved_tokens, bal.spent_usd) == (125, 0, D("0.1201"))
            assert b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl")) == b""
        finally:
            await ledger.close()


async def test_spool_of_a_dead_process_is_replayed_by_the_next_without_duplicates(
    backend: str, shared: Stores, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    with proxy_for(shared.pg_url) as proxy:
        first = make(backend, tmp_path, dataclasses.replace(shared, pg_url=proxy.url_for(shared.pg_url)))
        await first.start()
        await first.record([entry("r1", attempt=1, tenant="t", cost_usd="0.25")])
        await first.record([entry("r2", attempt=1, tenant="t", cost_usd="0.5")])
        await first.flush()  # r1, r2 in the store
        proxy.cut()
        await first.record([entry("r2", attempt=1, tenant="t", cost_usd="0.5"),  # a replay
                            entry("r3", attempt=1, tenant="t", cost_usd="0.125")])
        await first.close()  # cannot apply: stays in its spool file
    assert len(list(spool.glob("*.jsonl"))) == 1
    for _ in range(2):  # two processes in a row: the second finds nothing left
        nxt = make(backend, tmp_path, shared)
        await nxt.start()
        await nxt.flush()
        [total] = await nxt.spend(None, None, "t", [])
        assert (total.requests, total.cost_usd) == (3, D("0.875"))
        await nxt.close()
    assert list(spool.glob("*.jsonl")) == []


async def test_alerts_are_claimed_once_across_replicas(backend: str, shared: Stores, tmp_path: Path) -> None:
    a, b = make(backend, tmp_path / "a", shared), make(backend, tmp_path / "b", shared)
    await _start(a, b)
    try:
        claims = await asyncio.gather(*(x.claim_alert("t", "day:2026-11-25", "0.5") for x in (a, b, a, b)))
        assert sorted(claims) == [False, False, False, True]
        assert await a.claim_alert("t", "day:2026-11-26", "0.5") is True
        assert await b.claim_alert("t", "day:2026-11-25", "0.8") is True
    finally:
        await _close(a, b)
