"""A small psycopg 3 connection pool per store, with connection failures mapped to
``StoreUnavailable`` in this one place.

Deliberately simple instead of psycopg_pool: a checkout reuses an idle connection or opens
a new one right away, so the first request after an outage reconnects at once (no
background reconnect backoff), and a connection that broke is simply dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import psycopg

from budgets import _pgschema
from budgets.ledger import StoreUnavailable
from budgets.pgmigrate import apply_migrations

T = TypeVar("T")
STORE = "postgresql"
_FAILURES = (psycopg.OperationalError, OSError, TimeoutError)


class PgPool:
    """``run(fn)`` calls ``fn(conn)`` on a pooled autocommit connection; a failure to reach
    the server is retried once on a fresh connection (pooled ones may be stale after an
    outage) and then raised as ``StoreUnavailable``. ``fn`` must be safe to run twice."""

    def __init__(
        self, url: str, *, max_size: int = 8, timeout_s: float = 2.0, migrate: bool = True
    ) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._migrate = migrate
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(max_size)
        self._closed = False

    async def open(self) -> None:
        """Bring the budgets schema up to date; raises ``StoreUnavailable`` if unreachable."""
        if self._migrate:
            await self.run(
                lambda conn: apply_migrations(conn, _pgschema.COMPONENT, _pgschema.MIGRATIONS)
            )

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._closed:
            raise RuntimeError("pool is closed")
        async with asyncio.timeout(self._timeout_s):
            await self._slots.acquire()
        conn: psycopg.AsyncConnection | None = None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            yield conn
        finally:
            self._slots.release()
            if conn is not None:
                if conn.closed or conn.broken or self._closed or conn.info.transaction_status:
                    await conn.close()
                else:
                    self._idle.append(conn)

    async def _connect(self) -> psycopg.AsyncConnection:
        async with asyncio.timeout(self._timeout_s):
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self._timeout_s))
            )

    async def run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        last: BaseException | None = None
        for _ in range(2):
            try:
                async with self.connection() as conn:
                    return await fn(conn)
            except _FAILURES as exc:
                last = exc
        raise StoreUnavailable(STORE, type(last).__name__) from last

    async def check(self) -> None:
        async def ping(conn: psycopg.AsyncConnection) -> None:
            await conn.execute("SELECT 1")

        await self.run(ping)
