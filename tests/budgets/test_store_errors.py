"""A store that answers with an error (Redis OOM / READONLY, PostgreSQL read-only standby) or
does not answer at all (a hung PostgreSQL) is an outage like any other: ``StoreUnavailable``,
so callers fail closed, the ledger reports degraded, writes are spooled and replayed once.
Programming errors stay what they are."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.exceptions

from budgets import (
    BudgetLimit,
    Ledger,
    PgPool,
    PgRowStore,
    PostgresLedger,
    RedisLedger,
    StoreUnavailable,
)
from tests.budgets.factories import NOW, entry
from tests.refusingstores import PgDatabase, PrivateRedis, pg_database, private_redis
from tests.services import PG_URL, pg_schema, require
from tests.tcpproxy import proxy_for

D = Decimal
DAY = [BudgetLimit("day", max_tokens=1000, max_usd=D("1"))]


@asynccontextmanager
async def refusing(kind: str, tmp: Path) -> AsyncIterator[tuple[Ledger, Any]]:
    """A started ledger on a store the test can make refuse writes (``refuse``/``accept``)."""
    with ExitStack() as stack:
        options: dict[str, Any] = {"spool_dir": str(tmp / "spool"), "flush_interval_s": 0.01}
        store: PrivateRedis | PgDatabase
        if kind.startswith("redis"):
            store = stack.enter_context(private_redis(tmp))
            ledger: Ledger = RedisLedger(store.url, PgRowStore(PgPool(stack.enter_context(pg_schema()))),
                                         prefix="gwt", **options)
        else:
            store = stack.enter_context(pg_database())
            ledger = PostgresLedger(PgPool(store.url), **options)
        await ledger.start()
        try:
            yield ledger, store
        finally:
            await ledger.close()


def _refuse(kind: str, store: Any) -> None:
    if kind == "redis-oom":
        store.refuse("oom")
    elif kind == "redis-readonly":
        store.refuse("readonly")
    else:
        store.refuse()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["redis-oom", "redis-readonly", "postgres-readonly"])
async def test_a_store_refusing_writes_fails_closed_spools_and_recovers(kind: str, tmp_path: Path) -> None:
    async with refusing(kind, tmp_path) as (ledger, store):
        res = await ledger.reserve("t", DAY, 300, D("0.3"), NOW)
        await asyncio.to_thread(_refuse, kind, store)
        with pytest.raises(StoreUnavailable) as caught:
            await ledger.reserve("t", DAY, 1, D("0"), NOW)
        assert caught.value.store == ("redis" if kind.startswith("redis") else "postgresql")
        assert ledger.failing_since is not None  # type: ignore[attr-defined]  # gateway: 503 at once, /readyz degraded
        with pytest.raises(StoreUnavailable):
            await ledger.check()  # a store that answers PING / SELECT 1 but cannot write is not ready
        await ledger.settle(res, [entry("r1", attempt=1, tenant="t", input_tokens=120, output_tokens=0,
                                        cost_usd="0.12")])
        with pytest.raises(StoreUnavailable):
            await ledger.flush()  # kept, and spooled for the next process should this one die
        spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl"))
        assert b'"r1"' in spooled
        await asyncio.to_thread(store.accept)
        await until(lambda: _healthy(ledger))

        async def applied() -> bool:
            return ledger.queued == 0 and ledger.failing_since is None  # type: ignore[attr-defined,no-any-return]

        await until(applied)
        [bal] = await ledger.balance("t", DAY, NOW)
        assert (bal.spent_tokens, bal.reserved_tokens, bal.spent_usd) == (120, 0, D("0.12"))
        assert b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl")) == b""


async def _healthy(ledger: Ledger) -> bool:
    try:
        await ledger.check()
    except StoreUnavailable:
        return False
    return True


async def test_programming_errors_are_not_store_outages(tmp_path: Path) -> None:
    with ExitStack() as stack:
        pool = PgPool(stack.enter_context(pg_schema()))
        await pool.open()
        try:
            async def wrong(conn: psycopg.AsyncConnection) -> None:
                raise TypeError("a bug")

            with pytest.raises(TypeError):
                await pool.run(wrong)

            async def bad_sql(conn: psycopg.AsyncConnection) -> None:
                await conn.execute("SELECT no_such_function_anywhere()")

            with pytest.raises(psycopg.errors.UndefinedFunction):
                await pool.run(bad_sql)
            await pool.check()  # and the pool still works
        finally:
            await pool.close()
        redis_store = stack.enter_context(private_redis(tmp_path))
        ledger = RedisLedger(redis_store.url, PgRowStore(PgPool(stack.enter_context(pg_schema()))), prefix="gwt")
        await ledger.start()
        try:
            with pytest.raises(redis.exceptions.DataError):  # an argument Redis cannot take: our bug
                await ledger._call("claim", [{"not": "encodable"}])
            assert ledger.failing_since is None
        finally:
            await ledger.close()


async def test_a_hung_postgres_fails_within_the_store_timeout() -> None:
    url = require(PG_URL)
    with proxy_for(url) as proxy:
        pool = PgPool(proxy.url_for(url), timeout_s=1.0, migrate=False)
        await pool.check()  # one idle connection in the pool
        proxy.stall()  # the server accepts, and never answers
        for _ in range(2):  # the pooled connection, then a fresh one
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await pool.check()
            assert caught.value.store == "postgresql"
            assert time.monotonic() - started < 2.5
        proxy.restore()
        await pool.check()  # back at once, no restart
        await pool.close()


async def test_a_hung_postgres_fails_a_ledger_within_the_store_timeout(tmp_path: Path) -> None:
    with ExitStack() as stack:
        schema_url = stack.enter_context(pg_schema())
        proxy = stack.enter_context(proxy_for(schema_url))
        ledger = PostgresLedger(PgPool(proxy.url_for(schema_url), timeout_s=1.0), spool_dir=str(tmp_path / "spool"),
                                flush_interval_s=0.01)
        await ledger.start()
        try:
            res = await ledger.reserve("t", DAY, 300, D("0.3"), NOW)
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await ledger.reserve("t", DAY, 1, D("0"), NOW)
            assert time.monotonic() - started < 2.5
            await ledger.settle(res, [entry("r1", attempt=1, tenant="t", input_tokens=100, output_tokens=0,
                                            cost_usd="0.1")])
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await ledger.flush()
            assert time.monotonic() - started < 2.5
            assert b'"r1"' in b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl"))
            proxy.restore()

            async def applied() -> bool:
                return ledger.queued == 0 and ledger.failing_since is None  # type: ignore[attr-defined,no-any-return]

            await until(applied)
            [bal] = await ledger.balance("t", DAY, NOW)
            assert (bal.spent_tokens, bal.reserved_tokens) == (100, 0)
        finally:
            await ledger.close()
