"""A minimal, ordered schema migrator for PostgreSQL (psycopg 3), safe to run from many
replicas at once: every run takes one advisory lock, applies what is missing in order, and
records each step in ``schema_migrations``. Steps are append-only: never edit a shipped one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

__all__ = ["Migration", "applied_versions", "apply_migrations"]

_LOCK_ID = 0x67770001  # arbitrary, constant: "gw" migrations
_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


async def apply_migrations(
    conn: psycopg.AsyncConnection, component: str, migrations: Sequence[Migration]
) -> list[Migration]:
    """Apply the missing ``migrations`` of ``component``; returns the ones applied now."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"{component} migrations must have increasing, unique versions")
    done: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        await conn.execute(_BOOKKEEPING)
        have = await _versions(conn, component)
        for migration in migrations:
            if migration.version in have:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (component, version, name) VALUES (%s, %s, %s)",
                (component, migration.version, migration.name),
            )
            done.append(migration)
    return done


async def applied_versions(conn: psycopg.AsyncConnection, component: str) -> set[int]:
    exists = await (
        await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    return await _versions(conn, component)


async def _versions(conn: psycopg.AsyncConnection, component: str) -> set[int]:
    cursor = await conn.execute(
        "SELECT version FROM schema_migrations WHERE component = %s", (component,)
    )
    return {int(row[0]) for row in await cursor.fetchall()}
