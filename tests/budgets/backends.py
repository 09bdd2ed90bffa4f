"""Every ``Ledger`` backend, built against the real services (tests/services.py)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgets import (
    Ledger,
    PgPool,
    PgRowStore,
    PostgresLedger,
    RedisLedger,
    SqliteLedger,
)
from tests.services import REDIS_URL, pg_schema, redis_prefix

BACKENDS = ("sqlite", "postgres", "redis")
SHARED = ("postgres", "redis")


@dataclass(frozen=True)
class Stores:
    """One test's private PostgreSQL schema and Redis key prefix, which replicas share."""

    pg_url: str
    redis_url: str
    prefix: str


def stores(stack: ExitStack) -> Stores:
    return Stores(stack.enter_context(pg_schema()), REDIS_URL, stack.enter_context(redis_prefix()))


def make(name: str, tmp: Path, shared: Stores | None, **options: Any) -> Ledger:
    """A new, unstarted ledger of backend ``name`` on ``shared`` stores."""
    if name == "sqlite":
        return SqliteLedger(str(tmp / "ledger.db"), flush_interval_s=0.01)
    assert shared is not None
    kwargs = {"spool_dir": str(tmp / "spool"), "flush_interval_s": 0.01, **options}
    if name == "postgres":
        return PostgresLedger(PgPool(shared.pg_url), **kwargs)
    return RedisLedger(shared.redis_url, PgRowStore(PgPool(shared.pg_url)), prefix=shared.prefix, **kwargs)


@asynccontextmanager
async def started(name: str, tmp: Path, **options: Any) -> AsyncIterator[Ledger]:
    with ExitStack() as stack:
        ledger = make(name, tmp, None if name == "sqlite" else stores(stack), **options)
        await ledger.start()
        try:
            yield ledger
        finally:
            await ledger.close()
