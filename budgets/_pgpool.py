"""A small psycopg 3 connection pool per store, with store failures mapped to
``StoreUnavailable`` in this one place.

Deliberately simple instead of psycopg_pool: a checkout reuses an idle connection or opens
a new one right away, so the first request after an outage reconnects at once (no
background reconnect backoff), and a connection that broke is simply dropped.

A store failure is anything that says the server cannot serve now: it cannot be reached,
it hangs (every statement is bounded by ``timeout_s``), or it answers with a server-side
error (a read-only standby, an internal error, an administrator shutdown). Errors that say
the statement itself is wrong (``ProgrammingError``, ``DataError``, ``IntegrityError``,
``NotSupportedError``) and Python errors are bugs, and propagate unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import psycopg

from budgets import _pgschema
from budgets.ledger import StoreUnavailable
from budgets.pgmigrate import apply_migrations

T = TypeVar("T")
STORE = "postgresql"
_FAILURES = (psycopg.DatabaseError, OSError, TimeoutError)
#: Subclasses of ``DatabaseError`` that mean "this statement is wrong", not "the store is down".
_STATEMENT_ERRORS = (psycopg.ProgrammingError, psycopg.DataError, psycopg.IntegrityError,
                     psycopg.NotSupportedError)
_UNBOUNDED = -1.0
_READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"


def _hang_up(conn: psycopg.AsyncConnection) -> None:
    """The server did not answer in time: shut the socket down so the waiting statement fails
    at once. Not closed: the descriptor stays psycopg's, which then sees the connection end."""
    with contextlib.suppress(OSError, psycopg.Error):
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


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
        if self._migrate:  # a migration may take long on a big table: not bounded per statement
            await self.run(
                lambda conn: apply_migrations(conn, _pgschema.COMPONENT, _pgschema.MIGRATIONS),
                timeout_s=None,
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

    async def run(
        self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]], *, timeout_s: float | None = _UNBOUNDED
    ) -> T:
        """``fn(conn)``, given at most ``timeout_s`` (default: the pool's store timeout; None:
        unbounded) before the connection is dropped and ``StoreUnavailable`` raised."""
        bound = self._timeout_s if timeout_s == _UNBOUNDED else timeout_s
        last: BaseException | None = None
        for _ in range(2):
            hung: list[bool] = []
            try:
                async with self.connection() as conn:
                    return await self._bounded(fn, conn, bound, hung)
            except _FAILURES as exc:
                if isinstance(exc, _STATEMENT_ERRORS) and not hung:
                    raise
                last = exc
                if hung or isinstance(exc, TimeoutError):
                    break  # a store that hangs gets one timeout, not two
        detail = "no answer" if hung else type(last).__name__
        raise StoreUnavailable(STORE, detail) from last

    async def _bounded(
        self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]], conn: psycopg.AsyncConnection,
        bound: float | None, hung: list[bool],
    ) -> T:
        if bound is None:
            return await fn(conn)

        def give_up() -> None:
            hung.append(True)
            _hang_up(conn)

        timer = asyncio.get_running_loop().call_later(bound, give_up)
        try:
            return await fn(conn)
        finally:
            timer.cancel()

    async def check(self) -> None:
        """The server answers and takes writes (a standby or a read-only database does not)."""

        async def ping(conn: psycopg.AsyncConnection) -> bool:
            cur = await conn.execute(_READ_ONLY)
            row = await cur.fetchone()
            return bool(row and row[0])

        if await self.run(ping):
            raise StoreUnavailable(STORE, "read-only")
