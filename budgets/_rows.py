"""Durable ledger rows for the shared ledgers: the ``RowStore`` seam and its PostgreSQL and
SQLite implementations. ``insert`` is idempotent per (request id, attempt) and returns only
the rows that were new, which is what makes replays and retries count nothing twice."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import psycopg

from budgets import _store
from budgets._pgpool import PgPool
from budgets.ledger import LedgerEntry, SpendRow
from budgets.pricing import PriceVersion

_INSERT = (
    "INSERT INTO ledger_entries (request_id, attempt, ts, tenant, key_id, model, provider,"
    " input_tokens, output_tokens, cached_input_tokens, cost_usd, cost_nano_usd,"
    " usage_estimated, status, price_version, cache_write_tokens, usage_raw)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s::jsonb)"
    " ON CONFLICT (request_id, attempt) DO NOTHING RETURNING request_id, attempt"
)
#: Reports scan many rows: bounded, but far beyond the store timeout that admission statements get.
REPORT_TIMEOUT_S = 60.0
_GROUP_COLUMNS = {
    "tenant": "tenant",
    "model": "model",
    "day": "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


class RowStore(Protocol):
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None: ...

    async def insert(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]: ...

    async def window_totals(
        self, tenant: str, start: datetime | None, end: datetime | None
    ) -> tuple[int, Decimal]: ...

    async def spend(
        self,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]: ...

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool: ...

    async def entries(self, request_id: str) -> list[LedgerEntry]: ...

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None: ...

    async def price_versions(self) -> list[PriceVersion]: ...


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _params(e: LedgerEntry) -> tuple[object, ...]:
    return (
        e.request_id, e.attempt, _utc(e.ts), e.tenant, e.key_id, e.model, e.provider,
        e.input_tokens, e.output_tokens, e.cached_input_tokens, e.cost_usd,
        _store.to_nano_usd(e.cost_usd), e.usage_estimated, e.status, e.price_version,
        e.cache_write_tokens, _store.usage_json(e.usage_raw),
    )  # fmt: skip


class PgRowStore:
    """Rows in PostgreSQL (``ledger_entries``), shared by every replica."""

    name = "postgresql"

    def __init__(self, pool: PgPool) -> None:
        self.pool = pool

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    async def check(self) -> None:
        await self.pool.check()

    async def insert(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        if not entries:
            return []
        return await self.pool.run(lambda conn: insert_rows(conn, entries))

    async def window_totals(
        self, tenant: str, start: datetime | None, end: datetime | None
    ) -> tuple[int, Decimal]:
        sql = (
            "SELECT coalesce(sum(input_tokens + cached_input_tokens + output_tokens), 0),"
            " coalesce(sum(cost_usd), 0) FROM ledger_entries WHERE tenant = %s"
            " AND (%s::timestamptz IS NULL OR ts >= %s) AND (%s::timestamptz IS NULL OR ts < %s)"
        )

        async def query(conn: psycopg.AsyncConnection) -> tuple[int, Decimal]:
            cur = await conn.execute(sql, (tenant, start, start, end, end))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0]), Decimal(row[1])

        return await self.pool.run(query)

    async def spend(
        self,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]:
        groups = _store.checked_groups(group_by, _GROUP_COLUMNS)
        where: list[str] = ["TRUE"]
        params: list[object] = []
        for clause, value in (("ts >= %s", since), ("ts < %s", until), ("tenant = %s", tenant)):
            if value is not None:
                where.append(clause)
                params.append(value)
        columns = [_GROUP_COLUMNS[g] for g in groups]
        sql = "SELECT " + "".join(f"{c}, " for c in columns) + (
            "count(DISTINCT request_id), coalesce(sum(input_tokens), 0),"
            " coalesce(sum(output_tokens), 0), coalesce(sum(cached_input_tokens), 0),"
            " coalesce(sum(cost_nano_usd), 0) FROM ledger_entries WHERE "
        ) + " AND ".join(where)
        if columns:
            sql += " GROUP BY " + ", ".join(columns) + " ORDER BY " + ", ".join(columns)

        async def query(conn: psycopg.AsyncConnection) -> list[SpendRow]:
            cur = await conn.execute(sql, params)
            return [_store.spend_row(groups, r) for r in await cur.fetchall()]

        return await self.pool.run(query, timeout_s=REPORT_TIMEOUT_S)

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool:
        async def claim(conn: psycopg.AsyncConnection) -> bool:
            cur = await conn.execute(
                "INSERT INTO budget_alerts (tenant, window_key, fraction) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (tenant, window_key, fraction),
            )
            return cur.rowcount == 1

        return await self.pool.run(claim)

    async def entries(self, request_id: str) -> list[LedgerEntry]:
        sql = (f"SELECT {_store.ENTRY_COLUMNS} FROM ledger_entries WHERE request_id = %s"
               " ORDER BY attempt")  # fmt: skip

        async def query(conn: psycopg.AsyncConnection) -> list[LedgerEntry]:
            cur = await conn.execute(sql, (request_id,))
            return [_store.entry_from_record(r) for r in await cur.fetchall()]

        return await self.pool.run(query)

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None:
        sql = (f"INSERT INTO price_versions ({_store.PRICE_COLUMNS}) VALUES"
               " (%s,%s,%s::numeric,%s::numeric,%s::numeric,%s::numeric,now())"
               " ON CONFLICT (version) DO NOTHING")  # fmt: skip
        params = [_store.price_params(v) for v in versions]

        async def insert(conn: psycopg.AsyncConnection) -> None:
            if params:
                async with conn.cursor() as cur:
                    await cur.executemany(sql, params)

        await self.pool.run(insert)

    async def price_versions(self) -> list[PriceVersion]:
        sql = f"SELECT {_store.PRICE_COLUMNS} FROM price_versions ORDER BY version"

        async def query(conn: psycopg.AsyncConnection) -> list[PriceVersion]:
            cur = await conn.execute(sql)
            return [_store.price_from_record(r) for r in await cur.fetchall()]

        return await self.pool.run(query)


async def insert_rows(
    conn: psycopg.AsyncConnection, entries: Sequence[LedgerEntry]
) -> list[LedgerEntry]:
    """Insert in one transaction; return the entries that were not there before."""
    new: set[tuple[str, int]] = set()
    async with conn.transaction():
        cur = conn.cursor()
        await cur.executemany(_INSERT, [_params(e) for e in entries], returning=True)
        while True:
            for request_id, attempt in await cur.fetchall():
                new.add((request_id, int(attempt)))
            if not cur.nextset():
                break
    return [e for e in entries if (e.request_id, e.attempt) in new]


class SqliteRowStore:
    """Rows in one SQLite file, for ``--workers N`` on one host (WAL serializes writers)."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._conn = await asyncio.to_thread(_store.connect, self._path)

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

    async def check(self) -> None:
        if self._conn is None:
            raise RuntimeError("row store is closed")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            assert self._conn is not None, "row store is closed"
            return await asyncio.to_thread(fn, self._conn, *args)

    async def insert(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        if not entries:
            return []
        ignored = {(e.request_id, e.attempt) for e in await self._call(_store.insert_rows, entries)}
        return [e for e in entries if (e.request_id, e.attempt) not in ignored]

    async def window_totals(
        self, tenant: str, start: datetime | None, end: datetime | None
    ) -> tuple[int, Decimal]:
        tokens, nano = await self._call(_store.window_totals, tenant, start, end)
        return tokens, _store.from_nano_usd(nano)

    async def spend(
        self,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]:
        rows: list[SpendRow] = await self._call(_store.spend_rows, since, until, tenant, list(group_by))
        return rows

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool:
        claimed: bool = await self._call(_store.claim_alert, tenant, window_key, fraction)
        return claimed

    async def entries(self, request_id: str) -> list[LedgerEntry]:
        rows: list[LedgerEntry] = await self._call(_store.read_entries, request_id)
        return rows

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None:
        await self._call(_store.insert_prices, list(versions))

    async def price_versions(self) -> list[PriceVersion]:
        versions: list[PriceVersion] = await self._call(_store.read_prices)
        return versions
