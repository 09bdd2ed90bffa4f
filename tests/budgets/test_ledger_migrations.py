"""Ledger databases made by an older release open, keep their rows and gain the new columns."""
from __future__ import annotations

import sqlite3
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from budgets import (
    PgPool,
    PostgresLedger,
    Price,
    PriceVersion,
    SqliteLedger,
    price_version,
)
from budgets._pgschema import COMPONENT, MIGRATIONS
from budgets.pgmigrate import applied_versions, apply_migrations
from tests.budgets.factories import NOW, entry
from tests.services import pg_schema

D = Decimal

#: The SQLite ledger table as the first release created it (before cache writes and raw usage).
OLD_SQLITE_SCHEMA = """
CREATE TABLE ledger_entries (
    request_id TEXT NOT NULL, attempt INTEGER NOT NULL, ts TEXT NOT NULL, tenant TEXT NOT NULL,
    key_id TEXT, model TEXT NOT NULL, provider TEXT NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL, cost_usd TEXT NOT NULL,
    cost_nano_usd INTEGER NOT NULL, usage_estimated INTEGER NOT NULL, status TEXT NOT NULL,
    price_version TEXT NOT NULL, PRIMARY KEY (request_id, attempt)
);
INSERT INTO ledger_entries VALUES ('old', 1, '2026-11-25T13:05:09.000000Z', 'search-team', 'key-1',
    'gpt-4o-mini', 'openai', 100, 50, 0, '0.0001', 100000, 0, 'ok', 'config');
"""

NEW = replace(entry("new", attempt=1, input_tokens=300, cached_input_tokens=10, cost_usd="0.0002"),
              cache_write_tokens=200, usage_raw={"input_tokens": 100, "cache_creation_input_tokens": 200})


async def _old_row_reads_back_and_new_rows_record(ledger: Any) -> None:
    """The row written by the old schema reads back with the new fields empty; new rows keep them."""
    [old] = await ledger.entries("old")
    assert old == entry("old", attempt=1) and (old.cache_write_tokens, old.usage_raw) == (0, None)
    await ledger.record([NEW])
    assert await ledger.entries("new") == [NEW]
    [total] = await ledger.spend(None, None, None, [])
    assert (total.requests, total.input_tokens, total.cost_usd) == (2, 400, D("0.0003"))


async def test_sqlite_ledger_from_an_old_release_gains_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SQLITE_SCHEMA)
    ledger = SqliteLedger(str(db))
    await ledger.start()
    try:
        await _old_row_reads_back_and_new_rows_record(ledger)
        price = Price(D(1), D(2))
        await ledger.record_prices([PriceVersion(price_version(price), "m", price)])
        assert [(v.model, v.price) for v in await ledger.price_versions()] == [("m", price)]
    finally:
        await ledger.close()
    with sqlite3.connect(db) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(ledger_entries)")]
    assert columns[-2:] == ["cache_write_tokens", "usage_raw"]
    reopened = SqliteLedger(str(db))  # a second open finds nothing to add
    await reopened.start()
    try:
        assert [e.request_id for e in await reopened.entries("new")] == ["new"]
    finally:
        await reopened.close()


async def test_postgresql_schema_at_version_1_is_migrated(tmp_path: Path) -> None:
    with pg_schema() as url:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await apply_migrations(conn, COMPONENT, MIGRATIONS[:1])
            await conn.execute(
                "INSERT INTO ledger_entries (request_id, attempt, ts, tenant, key_id, model, provider,"
                " input_tokens, output_tokens, cached_input_tokens, cost_usd, cost_nano_usd,"
                " usage_estimated, status, price_version) VALUES"
                " ('old', 1, %s, 'search-team', 'key-1', 'gpt-4o-mini', 'openai', 100, 50, 0, 0.0001,"
                " 100000, false, 'ok', 'config')", (NOW,))
        ledger = PostgresLedger(PgPool(url), spool_dir=str(tmp_path / "spool"), flush_interval_s=0.01)
        await ledger.start()
        try:
            await _old_row_reads_back_and_new_rows_record(ledger)
        finally:
            await ledger.close()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            assert await applied_versions(conn, COMPONENT) == {1, 2}
