"""The gateway's own tables (keys, audit) in PostgreSQL, behind ``gateway.db.connect``.

The modules that use those tables speak SQLite's DB-API (``?`` placeholders, ``BEGIN
IMMEDIATE``, ``json_extract``, ``INSERT OR IGNORE``, ``with conn:``). ``CompatConnection``
keeps that interface on a psycopg 3 connection by rewriting those few constructs, so a
storage module works on both databases unchanged. Errors come out as ``sqlite3`` error
types, which those modules already handle. ``BEGIN IMMEDIATE`` (SQLite's single writer)
becomes a transaction holding one advisory lock, so writers from every replica serialize
exactly as processes sharing a SQLite file do (the audit hash chain relies on it).
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from types import TracebackType
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from budgets import _pgschema
from budgets.pgmigrate import Migration, applied_versions, apply_migrations

COMPONENT = "gateway"
_WRITE_LOCK = 0x67770002
MIGRATIONS = (
    Migration(1, "api keys and audit records", """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS audit_records (
    seq BIGINT PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    tenant TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts);
CREATE INDEX IF NOT EXISTS audit_records_request_id ON audit_records (request_id);
"""),
)


class StoreDown(sqlite3.OperationalError):
    """PostgreSQL could not be reached (an ``sqlite3.Error``, so existing handlers apply)."""


def _mapped(exc: psycopg.Error) -> sqlite3.Error:
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return StoreDown(f"postgresql unavailable ({type(exc).__name__})")
    if isinstance(exc, psycopg.IntegrityError):
        return sqlite3.IntegrityError(type(exc).__name__)
    return sqlite3.DatabaseError(f"{type(exc).__name__}: {exc}")


async def migrate(url: str) -> list[str]:
    """Apply every pending migration (budgets and gateway); returns what was applied."""
    done: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=5) as conn:
        for component, steps in ((_pgschema.COMPONENT, _pgschema.MIGRATIONS), (COMPONENT, MIGRATIONS)):
            for step in await apply_migrations(conn, component, steps):
                done.append(f"{component} {step.version}: {step.name}")
    return done


async def pending(url: str) -> list[str]:
    """Migrations not applied yet."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=5) as conn:
        out = []
        for component, steps in ((_pgschema.COMPONENT, _pgschema.MIGRATIONS), (COMPONENT, MIGRATIONS)):
            have = await applied_versions(conn, component)
            out += [f"{component} {s.version}: {s.name}" for s in steps if s.version not in have]
        return out


def connect(url: str) -> CompatConnection:
    """A connection with the schema up to date (migrated on first use if needed)."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=2)
    except psycopg.Error as exc:
        raise _mapped(exc) from exc
    compat = CompatConnection(conn, url)
    try:
        row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        current = bool(row and row[0]) and conn.execute(
            "SELECT 1 FROM schema_migrations WHERE component = %s AND version = %s",
            (COMPONENT, MIGRATIONS[-1].version),
        ).fetchone() is not None
        if not current:
            _migrate_sync(url)
    except psycopg.Error as exc:
        conn.close()
        raise _mapped(exc) from exc
    return compat


def _migrate_sync(url: str) -> None:
    # Its own thread and loop: callers may be on an event loop's thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, migrate(url)).result()


class CompatConnection:
    """The subset of ``sqlite3.Connection`` the gateway's storage modules use."""

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self._conn = conn
        self._url = url

    def _live(self) -> psycopg.Connection:
        """The connection, reopened if the server dropped it (long-lived writers heal after
        an outage without a restart; a transaction in progress is never silently replaced)."""
        if self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=2)
        return self._conn

    @property
    def in_transaction(self) -> bool:
        if self._conn.closed or self._conn.broken:
            return False
        return self._conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.Cursor:
        statement = sql.strip().rstrip(";").upper()
        try:
            conn = self._live()
            if statement == "BEGIN IMMEDIATE":
                cur = conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                return cur
            if statement.startswith("PRAGMA"):
                return conn.execute("SELECT 1")
            return conn.execute(translate(sql, bool(params)), params or None)
        except psycopg.Error as exc:
            raise _mapped(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor:
        try:
            cur = self._live().cursor()
            cur.executemany(translate(sql, True), list(rows))
        except psycopg.Error as exc:
            raise _mapped(exc) from exc
        return cur

    def executescript(self, script: str) -> None:
        """Schema scripts are SQLite's: PostgreSQL gets its schema from ``MIGRATIONS``."""

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CompatConnection:  # noqa: PYI034 - mirrors sqlite3.Connection
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.rollback()


_JSON_EXTRACT = re.compile(r"json_extract\(", re.IGNORECASE)
_OR_IGNORE = re.compile(r"INSERT\s+OR\s+IGNORE\s+INTO", re.IGNORECASE)
_LIMIT = re.compile(r"LIMIT %s", re.IGNORECASE)


@lru_cache(maxsize=512)
def translate(sql: str, has_params: bool) -> str:
    """SQLite dialect -> PostgreSQL for the constructs the storage modules use."""
    out = _json_extracts(sql)
    if _OR_IGNORE.search(out):
        out = _OR_IGNORE.sub("INSERT INTO", out).rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    if has_params:
        out = _placeholders(out.replace("%", "%%"))
        out = _LIMIT.sub("LIMIT NULLIF(%s, -1)", out)  # SQLite's LIMIT -1 means no limit
    return out


def _placeholders(sql: str) -> str:
    parts, quoted = [], False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        parts.append("%s" if ch == "?" and not quoted else ch)
    return "".join(parts)


def _json_extracts(sql: str) -> str:
    """``json_extract(expr, '$.a.b')`` -> ``((expr)::jsonb #>> '{a,b}')``."""
    while (match := _JSON_EXTRACT.search(sql)) is not None:
        depth, i, comma = 1, match.end(), -1
        while depth:
            ch = sql[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "," and depth == 1:
                comma = i
            i += 1
        expr, path = sql[match.end():comma].strip(), sql[comma + 1:i - 1].strip().strip("'")
        keys = ",".join(path.removeprefix("$.").split("."))
        sql = f"{sql[:match.start()]}(({expr})::jsonb #>> '{{{keys}}}'){sql[i:]}"
    return sql
