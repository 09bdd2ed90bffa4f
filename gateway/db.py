"""The gateway's own tables (keys, audit), in SQLite or PostgreSQL. Budgets keep theirs in budgets/."""
from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
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
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    tenant TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts);
"""


def is_postgres(target: Path | str) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection with the gateway schema in place (WAL, so readers never block the writer).

    ``path`` may also be a ``postgresql://`` URL: the same interface, on PostgreSQL
    (gateway/db_pg.py), with the schema migrated by the gateway itself.
    """
    if is_postgres(path):
        from gateway.db_pg import connect as connect_pg

        return connect_pg(str(path))  # type: ignore[return-value]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn
