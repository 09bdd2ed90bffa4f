"""`gateway migrate --config FILE [--status]`: create or upgrade the PostgreSQL schema.

Safe to run while replicas serve and from several hosts at once (one advisory lock; each
step recorded in `schema_migrations`). `gateway serve` applies pending steps at start too,
so running it by hand is only needed to migrate ahead of a deploy. SQLite needs nothing.
"""
from __future__ import annotations

import asyncio
import sys

import psycopg

from gateway.config import LoadedConfig
from gateway.db import is_postgres


def migrate_command(loaded: LoadedConfig, *, status_only: bool = False) -> int:
    from gateway.db_pg import migrate, pending

    url = loaded.config.state.database_url
    if not is_postgres(url):
        print("state.database_url is SQLite: its schema is created on first use; nothing to migrate")
        return 0
    try:
        if status_only:
            steps = asyncio.run(pending(url))
            print("\n".join(f"pending: {s}" for s in steps) or "schema is up to date")
            return 0
        applied = asyncio.run(migrate(url))
    except (OSError, psycopg.OperationalError) as exc:
        print(f"error: cannot reach PostgreSQL: {type(exc).__name__}", file=sys.stderr)
        return 1
    print("\n".join(f"applied: {s}" for s in applied) or "schema is up to date")
    return 0
