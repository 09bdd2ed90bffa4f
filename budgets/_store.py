"""Blocking SQLite work for ``SqliteLedger``. Every function here runs in a worker thread.

Timestamps are stored as fixed-width UTC text (``2026-11-25T13:05:09.000123Z``), so text
order is time order and ``substr(ts, 1, 10)`` is the UTC day. Cost is stored twice: the
exact Decimal as TEXT, and integer nano-USD so SQL can sum it without floats.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson

from budgets._codec import usage_numbers
from budgets.ledger import GROUP_BY_FIELDS, LedgerEntry, SpendRow
from budgets.pricing import Price, PriceVersion

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_entries (
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ts TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cost_usd TEXT NOT NULL,
    cost_nano_usd INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL,
    status TEXT NOT NULL,
    price_version TEXT NOT NULL,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    usage_raw TEXT,
    PRIMARY KEY (request_id, attempt)
);
CREATE INDEX IF NOT EXISTS ledger_entries_tenant_ts ON ledger_entries (tenant, ts);
CREATE INDEX IF NOT EXISTS ledger_entries_ts ON ledger_entries (ts);
CREATE TABLE IF NOT EXISTS budget_alerts (
    tenant TEXT NOT NULL,
    window_key TEXT NOT NULL,
    fraction TEXT NOT NULL,
    claimed_at TEXT NOT NULL,
    PRIMARY KEY (tenant, window_key, fraction)
);
CREATE TABLE IF NOT EXISTS price_versions (
    version TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    input_usd_per_mtok TEXT NOT NULL,
    output_usd_per_mtok TEXT NOT NULL,
    cached_input_usd_per_mtok TEXT,
    cache_write_usd_per_mtok TEXT,
    first_seen TEXT NOT NULL
);
"""
#: Columns added after the first release: (name, definition) for ALTER TABLE on old files.
_ADDED_COLUMNS = (
    ("cache_write_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("usage_raw", "TEXT"),
)
ENTRY_COLUMNS = (
    "request_id, attempt, ts, tenant, key_id, model, provider, input_tokens, output_tokens,"
    " cached_input_tokens, cost_usd, usage_estimated, status, price_version,"
    " cache_write_tokens, usage_raw"
)
PRICE_COLUMNS = (
    "version, model, input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok,"
    " cache_write_usd_per_mtok, first_seen"
)

_INSERT = (
    "INSERT OR IGNORE INTO ledger_entries (request_id, attempt, ts, tenant, key_id, model,"
    " provider, input_tokens, output_tokens, cached_input_tokens, cost_usd, cost_nano_usd,"
    " usage_estimated, status, price_version, cache_write_tokens, usage_raw)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

_GROUP_COLUMNS = {"tenant": "tenant", "model": "model", "day": "substr(ts, 1, 10)"}
_NANO = Decimal("1e-9")

Row = tuple[
    str, int, str, str, str | None, str, str, int, int, int, str, int, int, str, str, int,
    str | None,
]


def format_ts(ts: datetime) -> str:
    """Fixed-width UTC text; naive datetimes are taken to be UTC."""
    t = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:"
        f"{t.second:02d}.{t.microsecond:06d}Z"
    )


def to_nano_usd(usd: Decimal) -> int:
    return int(usd.quantize(_NANO, rounding=ROUND_HALF_UP).scaleb(9))


def from_nano_usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9)


def connect(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the ledger database in WAL mode."""
    if path != ":memory:" and not path.startswith("file:"):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
    # One connection, used by one worker thread at a time (the ledger's lock serializes).
    conn = sqlite3.connect(
        path, check_same_thread=False, isolation_level=None, timeout=5.0
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        _add_missing_columns(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a ledger file made by an older release up to the current columns."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(ledger_entries)")}
    for name, definition in _ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE ledger_entries ADD COLUMN {name} {definition}")


def usage_json(raw: dict[str, Any] | None) -> str | None:
    """The stored form of ``LedgerEntry.usage_raw``: its numbers, as JSON text."""
    numbers = usage_numbers(raw)
    return None if numbers is None else orjson.dumps(numbers).decode()


def usage_from_json(stored: object) -> dict[str, Any] | None:
    """``usage_raw`` read back: JSON text (SQLite) or an already decoded object (JSONB)."""
    if stored is None:
        return None
    value = orjson.loads(stored) if isinstance(stored, (str, bytes)) else stored
    return value if isinstance(value, dict) else None


def _row(entry: LedgerEntry) -> Row:
    return (
        entry.request_id,
        entry.attempt,
        format_ts(entry.ts),
        entry.tenant,
        entry.key_id,
        entry.model,
        entry.provider,
        entry.input_tokens,
        entry.output_tokens,
        entry.cached_input_tokens,
        str(entry.cost_usd),
        to_nano_usd(entry.cost_usd),
        int(entry.usage_estimated),
        entry.status,
        entry.price_version,
        entry.cache_write_tokens,
        usage_json(entry.usage_raw),
    )


def insert_rows(
    conn: sqlite3.Connection, entries: Sequence[LedgerEntry]
) -> list[LedgerEntry]:
    """Insert in one transaction; return the entries ignored as already present."""
    rows = [_row(entry) for entry in entries]
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.executemany(_INSERT, rows)
        if cursor.rowcount == len(rows):
            conn.execute("COMMIT")
            return []
        # Some were duplicates: redo row by row to learn which (rare path).
        conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        ignored = [
            e
            for e, row in zip(entries, rows)
            if conn.execute(_INSERT, row).rowcount == 0
        ]
        conn.execute("COMMIT")
        return ignored
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def claim_alert(
    conn: sqlite3.Connection, tenant: str, window_key: str, fraction: str
) -> bool:
    """Record an alert crossing; False if it was recorded before."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO budget_alerts (tenant, window_key, fraction, claimed_at)"
        " VALUES (?,?,?,?)",
        (tenant, window_key, fraction, format_ts(datetime.now(UTC))),
    )
    return cursor.rowcount == 1


def window_totals(
    conn: sqlite3.Connection, tenant: str, start: datetime | None, end: datetime | None
) -> tuple[int, int]:
    """(tokens, nano-USD) of ``tenant`` with ``start <= ts < end``."""
    sql = (
        "SELECT COALESCE(SUM(input_tokens + cached_input_tokens + output_tokens), 0),"
        " COALESCE(SUM(cost_nano_usd), 0) FROM ledger_entries WHERE tenant = ?"
    )
    params: list[str] = [tenant]
    if start is not None:
        sql += " AND ts >= ?"
        params.append(format_ts(start))
    if end is not None:
        sql += " AND ts < ?"
        params.append(format_ts(end))
    tokens, nano = conn.execute(sql, params).fetchone()
    return int(tokens), int(nano)


def spend_rows(
    conn: sqlite3.Connection,
    since: datetime | None,
    until: datetime | None,
    tenant: str | None,
    group_by: Sequence[str],
) -> list[SpendRow]:
    """Totals grouped by ``group_by`` (a subset of ``GROUP_BY_FIELDS``), sorted by group."""
    groups = checked_groups(group_by, _GROUP_COLUMNS)
    where: list[str] = []
    params: list[str] = []
    for clause, value in (("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            where.append(clause)
            params.append(format_ts(value))
    if tenant is not None:
        where.append("tenant = ?")
        params.append(tenant)
    columns = [_GROUP_COLUMNS[g] for g in groups]
    sql = "SELECT " + "".join(f"{c}, " for c in columns)
    sql += (
        "COUNT(DISTINCT request_id), COALESCE(SUM(input_tokens), 0),"
        " COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cached_input_tokens), 0),"
        " COALESCE(SUM(cost_nano_usd), 0) FROM ledger_entries"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    if columns:
        sql += " GROUP BY " + ", ".join(columns) + " ORDER BY " + ", ".join(columns)
    return [spend_row(groups, record) for record in conn.execute(sql, params)]


def checked_groups(group_by: Sequence[str], known: Collection[str]) -> list[str]:
    """``group_by`` without repeats; ``ValueError`` if it names a field not in ``known``."""
    groups = list(dict.fromkeys(group_by))
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(
            f"cannot group spend by {unknown}; choose from {list(GROUP_BY_FIELDS)}"
        )
    return groups


def spend_row(groups: Sequence[str], record: Sequence[Any]) -> SpendRow:
    """One result row of a spend query: the group values, then the five totals."""
    keys = record[: len(groups)]
    requests, input_tokens, output_tokens, cached, nano = record[len(groups) :]
    return SpendRow(
        group={g: str(k) for g, k in zip(groups, keys)},
        requests=int(requests),
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        cached_input_tokens=int(cached),
        cost_usd=from_nano_usd(int(nano)),
    )


def entry_from_record(record: Sequence[Any]) -> LedgerEntry:
    """A ``LedgerEntry`` from a row of ``ENTRY_COLUMNS`` (SQLite text or PostgreSQL types)."""
    (request_id, attempt, ts, tenant, key_id, model, provider, input_tokens, output_tokens,
     cached, cost_usd, estimated, status, version, cache_write, usage_raw) = record  # fmt: skip
    return LedgerEntry(
        request_id=request_id, attempt=int(attempt),
        ts=datetime.fromisoformat(ts) if isinstance(ts, str) else ts,
        tenant=tenant, key_id=key_id, model=model, provider=provider,
        input_tokens=int(input_tokens), output_tokens=int(output_tokens),
        cached_input_tokens=int(cached), cost_usd=Decimal(cost_usd),
        usage_estimated=bool(estimated), status=status, price_version=version,
        cache_write_tokens=int(cache_write), usage_raw=usage_from_json(usage_raw),
    )  # fmt: skip


def read_entries(conn: sqlite3.Connection, request_id: str) -> list[LedgerEntry]:
    sql = f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE request_id = ? ORDER BY attempt"
    return [entry_from_record(r) for r in conn.execute(sql, (request_id,))]


def price_params(v: PriceVersion) -> tuple[object, ...]:
    """Insert parameters of ``v`` (without ``first_seen``); Decimals as exact text."""
    p = v.price

    def text(d: Decimal | None) -> str | None:
        return None if d is None else str(d)

    return (v.version, v.model, str(p.input_usd_per_mtok), str(p.output_usd_per_mtok),
            text(p.cached_input_usd_per_mtok), text(p.cache_write_usd_per_mtok))  # fmt: skip


def price_from_record(record: Sequence[Any]) -> PriceVersion:
    version, model, inp, out, cached, write, first_seen = record
    return PriceVersion(
        version=version, model=model,
        price=Price(Decimal(inp), Decimal(out), None if cached is None else Decimal(cached),
                    None if write is None else Decimal(write)),
        first_seen=datetime.fromisoformat(first_seen) if isinstance(first_seen, str) else first_seen,
    )  # fmt: skip


def insert_prices(conn: sqlite3.Connection, versions: Sequence[PriceVersion]) -> None:
    now = format_ts(datetime.now(UTC))
    conn.executemany(
        f"INSERT OR IGNORE INTO price_versions ({PRICE_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
        [(*price_params(v), now) for v in versions],
    )


def read_prices(conn: sqlite3.Connection) -> list[PriceVersion]:
    sql = f"SELECT {PRICE_COLUMNS} FROM price_versions ORDER BY version"
    return [price_from_record(r) for r in conn.execute(sql)]
