"""The embedded ledger: in-memory counters, SQLite rows written in the background."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial

from budgets import _store
from budgets._book import Slot, WindowBook
from budgets.ledger import (
    Balance,
    BudgetLimit,
    LedgerEntry,
    RequestRef,
    Reservation,
    SpendRow,
)
from budgets.pricing import PriceVersion
from budgets.windows import window_end, window_key, window_start

__all__ = ["SqliteLedger"]

logger = logging.getLogger("budgets")


class SqliteLedger:
    """``Ledger`` on one SQLite file, for a single gateway process.

    Hot path: ``reserve``/``settle``/``release`` touch only in-memory counters, which are
    authoritative for this process. A window's spend so far is read from the database once,
    in a worker thread, the first time that (tenant, window) is used; its counters then live
    under a key that names the period (``day:2026-11-25``), so they reset on their own at
    the boundary. Settled rows are queued and written in batches (``INSERT OR IGNORE``)
    by a background task every ``flush_interval_s``; a failed write keeps the rows queued
    and is retried on the next tick.

    Limits of single-process mode: reservations exist only in this process's memory, so
    if it dies they are simply lost (nothing was spent for them), and so are rows settled
    less than about one flush interval before the crash. Two processes sharing one file
    would each see only their own reservations; use a shared backend for replicas.
    """

    #: How many recent (request_id, attempt) pairs are remembered to drop replays at once.
    #: Older replays are still caught by the primary key when flushed, and taken back out.
    DEDUPE_CAPACITY = 100_000
    #: How often, and how long after their end, finished windows are dropped from memory.
    PRUNE_EVERY_S = 60.0
    PRUNE_GRACE = timedelta(minutes=5)
    #: Repeated flush failures are logged at most this often.
    FAILURE_LOG_EVERY_S = 10.0

    def __init__(
        self, path: str, *, flush_interval_s: float = 0.05, batch_size: int = 500
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be positive")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._path = path
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._conn: sqlite3.Connection | None = None
        # Serializes all database work, and makes window loads and flushes mutually
        # exclusive: a load sees each row exactly once, in the database or in the queue.
        self._db_lock = asyncio.Lock()
        self._book = WindowBook()
        self._reservations: dict[str, Reservation] = {}
        self._queue: list[LedgerEntry] = []
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._loading: dict[Slot, asyncio.Future[None]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._failing_since: float | None = None
        self._last_failure_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (creating tables) and start the background flusher."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        async with self._db_lock:
            await self._connection()
        self._ensure_flusher()

    async def close(self) -> None:
        """Stop the flusher and write everything still queued. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait({self._flusher})
            self._flusher = None
        async with self._db_lock:
            try:
                if self._queue:
                    await self._flush_locked()
            except Exception:
                ids = ", ".join(e.request_id for e in self._queue[:10])
                logger.error(
                    "ledger closed with %d unwritten rows (request ids: %s)",
                    len(self._queue),
                    ids,
                )
                raise
            finally:
                if self._conn is not None:
                    await asyncio.to_thread(self._conn.close)
                    self._conn = None

    # -- hot path: no database round trip once a window is loaded -------------------------

    async def balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime, *, fresh: bool = True
    ) -> list[Balance]:
        keys = [window_key(limit.window, now) for limit in limits]
        await self._load_windows(tenant, limits, keys, now)
        return [self._book.balance(tenant, lim, key) for lim, key in zip(limits, keys)]

    async def reserve(
        self,
        tenant: str,
        limits: Sequence[BudgetLimit],
        tokens: int,
        usd: Decimal,
        now: datetime,
        *,
        ref: RequestRef | None = None,
    ) -> Reservation:
        if tokens < 0 or usd < 0:
            raise ValueError("cannot reserve a negative amount")
        capped = [
            lim
            for lim in limits
            if lim.max_tokens is not None or lim.max_usd is not None
        ]
        keys = [window_key(limit.window, now) for limit in capped]
        await self._load_windows(tenant, capped, keys, now)
        # No await from here on: the check and the hold are one step for the event loop,
        # so concurrent reservations can never overshoot a cap together.
        for limit, key in zip(capped, keys):
            self._book.check(tenant, limit, key, tokens, usd)
        window_keys = tuple(dict.fromkeys(keys))
        self._book.hold(tenant, window_keys, tokens, usd)
        reservation = Reservation(
            id=f"{self._id_prefix}-{next(self._ids)}",
            tenant=tenant,
            tokens=tokens,
            usd=usd,
            window_keys=window_keys,
            created_at=now,
            ref=ref,
        )
        self._reservations[reservation.id] = reservation
        return reservation

    async def settle(
        self, reservation: Reservation, entries: Sequence[LedgerEntry]
    ) -> None:
        """Drop the hold and count ``entries`` in the windows their timestamps fall in.

        Settling the same reservation twice, or replaying an entry, counts nothing twice.
        """
        self._drop(reservation)
        self._append(entries)

    async def release(self, reservation: Reservation) -> None:
        self._drop(reservation)

    async def record(self, entries: Sequence[LedgerEntry]) -> None:
        self._append(entries)

    # -- persistence ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every queued row now; raises (keeping the rows queued) if the write fails."""
        async with self._db_lock:
            await self._flush_locked()

    async def check(self) -> None:
        """The embedded file is always reachable while the process runs."""
        if self._closed:
            raise RuntimeError("ledger is closed")

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool:
        async with self._db_lock:
            conn = await self._connection()
            return await asyncio.to_thread(
                _store.claim_alert, conn, tenant, window_key, fraction
            )

    async def spend(
        self,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]:
        if self._closed:
            raise RuntimeError("ledger is closed")
        async with self._db_lock:
            await self._flush_locked()
            conn = await self._connection()
            return await asyncio.to_thread(
                _store.spend_rows, conn, since, until, tenant, list(group_by)
            )

    async def entries(self, request_id: str) -> list[LedgerEntry]:
        if self._closed:
            raise RuntimeError("ledger is closed")
        async with self._db_lock:
            await self._flush_locked()
            conn = await self._connection()
            return await asyncio.to_thread(_store.read_entries, conn, request_id)

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None:
        async with self._db_lock:
            conn = await self._connection()
            await asyncio.to_thread(_store.insert_prices, conn, list(versions))

    async def price_versions(self) -> list[PriceVersion]:
        async with self._db_lock:
            conn = await self._connection()
            return await asyncio.to_thread(_store.read_prices, conn)

    # -- internals ------------------------------------------------------------------------

    def _drop(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.id, None) is not None:
            self._book.unhold(
                reservation.tenant,
                reservation.window_keys,
                reservation.tokens,
                reservation.usd,
            )

    def _append(self, entries: Sequence[LedgerEntry]) -> None:
        if self._closed:
            raise RuntimeError("ledger is closed; usage not recorded")
        recent = self._recent
        for entry in entries:
            ident = (entry.request_id, entry.attempt)
            if ident in recent:
                continue
            recent[ident] = None
            if len(recent) > self.DEDUPE_CAPACITY:
                recent.popitem(last=False)
            self._book.count(entry)
            self._queue.append(entry)
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(
                self._run_flusher(), name="budgets-ledger-flusher"
            )

    async def _connection(self) -> sqlite3.Connection:
        """The open connection; call with ``_db_lock`` held."""
        if self._conn is None:
            self._conn = await asyncio.to_thread(_store.connect, self._path)
        return self._conn

    async def _load_windows(
        self,
        tenant: str,
        limits: Sequence[BudgetLimit],
        keys: Sequence[str],
        now: datetime,
    ) -> None:
        # Loop: a window loaded earlier may have been pruned while we awaited another.
        while True:
            missing = [
                (lim.window, key)
                for lim, key in zip(limits, keys)
                if not self._book.is_loaded(tenant, key)
            ]
            if not missing:
                return
            for window, key in missing:
                await self._ensure_loaded(tenant, window, key, now)

    async def _ensure_loaded(
        self, tenant: str, window: str, key: str, now: datetime
    ) -> None:
        slot = (tenant, key)
        loading = self._loading.get(slot)
        if loading is None:
            loading = asyncio.ensure_future(self._load(tenant, window, key, now))
            self._loading[slot] = loading
            loading.add_done_callback(partial(self._loaded, slot))
        # Shielded: one caller being cancelled must not cancel the load others wait for.
        await asyncio.shield(loading)

    def _loaded(self, slot: Slot, future: asyncio.Future[None]) -> None:
        self._loading.pop(slot, None)
        if not future.cancelled():
            future.exception()  # mark retrieved; the waiters re-raise it

    async def _load(self, tenant: str, window: str, key: str, now: datetime) -> None:
        if self._closed:
            raise RuntimeError("ledger is closed")
        async with self._db_lock:
            if self._book.is_loaded(tenant, key):
                return
            conn = await self._connection()
            end = window_end(window, now)
            tokens, nano = await asyncio.to_thread(
                _store.window_totals, conn, tenant, window_start(window, now), end
            )
            usd = _store.from_nano_usd(nano)
            # Queued rows are not in the database yet (flushes wait for this lock).
            for entry in self._queue:
                if entry.tenant == tenant and window_key(window, entry.ts) == key:
                    tokens += entry.total_tokens
                    usd += entry.cost_usd
            self._book.install(tenant, window, key, end, tokens, usd)

    async def _flush_locked(self) -> None:
        if not self._queue:
            return
        conn = await self._connection()
        while self._queue:
            # Rows stay queued until written, so a failure loses nothing.
            batch = self._queue[: self._batch_size]
            ignored = await asyncio.to_thread(_store.insert_rows, conn, batch)
            del self._queue[: len(batch)]
            for entry in ignored:
                # Already in the database (a replay older than our memory): take it back out.
                self._book.count(entry, sign=-1)

    async def _run_flusher(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self.PRUNE_EVERY_S
        while True:
            await asyncio.sleep(self._flush_interval_s)
            if self._queue:
                # Shielded so close() cancelling this task never interrupts a write midway;
                # close() then waits for the lock and writes whatever is left.
                await asyncio.shield(self._background_flush())
            if loop.time() >= next_prune:
                next_prune = loop.time() + self.PRUNE_EVERY_S
                self._book.prune(datetime.now(UTC), self.PRUNE_GRACE)

    async def _background_flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._db_lock:
                await self._flush_locked()
        except Exception as exc:  # noqa: BLE001 - any failure: keep the rows, retry next tick
            now = loop.time()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._last_failure_log >= self.FAILURE_LOG_EVERY_S:
                self._last_failure_log = now
                ids = ", ".join(e.request_id for e in self._queue[:5])
                logger.warning(
                    "ledger flush failed (%s: %s); %d rows kept for retry (request ids: %s)",
                    type(exc).__name__,
                    exc,
                    len(self._queue),
                    ids,
                )
        else:
            if self._failing_since is not None:
                logger.info(
                    "ledger flush recovered after %.1fs",
                    loop.time() - self._failing_since,
                )
                self._failing_since = None
