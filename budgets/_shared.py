"""What the replica-shared ledgers (Redis, PostgreSQL) have in common.

Admission is one round trip to the shared store (``_reserve``). Everything after it is
batched: ``settle``/``release``/``record`` queue an ``Op`` and wake a background task that
applies whatever is queued in one go (group commit), so a settle costs no round trip of
its own. Until an op is applied its reservation keeps holding the worst case, which is
never less than the actual usage: a queued settle can make a budget stricter for a few
milliseconds, never looser.

Crash and outage rules (documented in docs/replicas.md):

- A live process renews the expiry of every reservation it still holds (``ttl/3``). One
  that stops renewing (killed) has its reservations claimed by any replica after the TTL
  and booked at their worst case (``expired_entry``): never under-recorded.
- An op the store cannot take is appended to a local spool file and kept queued; it is
  applied when the store is back, or by the next process using the same spool directory.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from budgets._ops import Op
from budgets._rows import RowStore
from budgets.ledger import (
    Balance,
    BudgetLimit,
    LedgerEntry,
    RequestRef,
    Reservation,
    SpendRow,
    StoreUnavailable,
    expired_entry,
)
from budgets.pricing import PriceVersion
from budgets.spool import Spool
from budgets.windows import window_key

log = logging.getLogger("budgets")


class SharedLedger(abc.ABC):
    """The ``Ledger`` protocol over a store shared by replicas; subclasses do the I/O."""

    store_name = "shared"
    FAILURE_LOG_EVERY_S = 10.0
    REAP_BATCH = 200
    #: Durable rows (spend reports and alert claims read them); set by the subclass.
    rows: RowStore

    def __init__(
        self,
        *,
        spool_dir: str | None = None,
        flush_interval_s: float = 0.05,
        batch_size: int = 500,
        reservation_ttl_s: float = 600.0,
    ) -> None:
        if reservation_ttl_s <= 0 or flush_interval_s <= 0 or batch_size < 1:
            raise ValueError("reservation_ttl_s, flush_interval_s and batch_size must be positive")
        self.reservation_ttl_s = reservation_ttl_s
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._spool = Spool(spool_dir, f"ledger-{self.store_name}") if spool_dir else None
        self._pending: list[Op] = []
        self._live: dict[str, Reservation] = {}
        # Tenants with queued usage that no reservation holds: their next admission
        # waits for it to be applied, so it can never be overlooked.
        self._unheld: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.instance = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self.failing_since: float | None = None
        self.failing_store: str | None = None
        self._last_failure_log = 0.0

    # -- subclass hooks --------------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _reserve(
        self, res: Reservation, limits: Sequence[BudgetLimit], now: datetime, expires_at: float
    ) -> None:
        """Check every cap and hold ``res`` in one atomic step; raise ``BudgetExceeded``."""

    @abc.abstractmethod
    async def _apply(self, ops: list[Op]) -> None:
        """Make ``ops`` durable and counted. Must leave ``ops`` safe to apply again."""

    @abc.abstractmethod
    async def _renew(self, ids: list[str], expires_at: float) -> None: ...

    @abc.abstractmethod
    async def _claim_expired(self, now: float, lease_s: float, limit: int) -> list[Reservation]:
        """Reservations whose expiry passed, each claimed for ``lease_s`` by this process."""

    @abc.abstractmethod
    async def _balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime
    ) -> list[Balance]: ...

    @abc.abstractmethod
    async def check(self) -> None: ...

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool:
        return await self.rows.claim_alert(tenant, window_key, fraction)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("ledger is closed")
        await self._open()
        if self._spool is not None:
            await self._spool.open()
            await self._adopt_orphans()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"budgets-{self.store_name}-ledger"
        )
        if self._pending:
            self._wake.set()

    async def close(self) -> None:
        """Stop background work and apply what is queued; what cannot be applied stays in
        the spool for the next process."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        try:
            await self.flush()
        except StoreUnavailable:
            log.error(
                "ledger closed with unapplied writes; they stay spooled",
                extra={"store": self.store_name, "ops": len(self._pending)},
            )
        finally:
            if self._spool is not None:
                await self._spool.close()
            await self._close()

    # -- the Ledger protocol ---------------------------------------------------------------

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
        if self._closed:
            raise RuntimeError("ledger is closed")
        capped = [lim for lim in limits if lim.max_tokens is not None or lim.max_usd is not None]
        keys = tuple(dict.fromkeys(window_key(lim.window, now) for lim in capped))
        res = Reservation(
            id=f"{self.instance}-{next(self._ids)}", tenant=tenant, tokens=tokens, usd=usd,
            window_keys=keys, created_at=now, ref=ref,
        )  # fmt: skip
        if keys:
            if self._unheld[tenant]:
                await self.flush()
            try:
                await self._reserve(res, capped, now, time.time() + self.reservation_ttl_s)
            except StoreUnavailable as exc:
                self.note_failure(exc)
                raise
            self._live[res.id] = res
        return res

    async def settle(self, reservation: Reservation, entries: Sequence[LedgerEntry]) -> None:
        self._enqueue(Op(reservation if reservation.window_keys else None, list(entries)))

    async def release(self, reservation: Reservation) -> None:
        if reservation.window_keys:
            self._enqueue(Op(reservation, []))

    async def record(self, entries: Sequence[LedgerEntry]) -> None:
        if entries:
            self._enqueue(Op(None, list(entries)))

    async def flush(self) -> None:
        """Apply every queued op now; raises ``StoreUnavailable`` (ops kept, spooled)."""
        async with self._flush_lock:
            while self._pending:
                batch = self._pending[: self._batch_size]
                try:
                    await self._apply(batch)
                except StoreUnavailable:
                    await self._spool_pending()
                    raise
                del self._pending[: len(batch)]
                for op in batch:
                    if op.reservation is None:
                        self._unheld.subtract({e.tenant for e in op.entries})
            if self._spool is not None:
                await self._spool.clear()

    async def balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime, *, fresh: bool = True
    ) -> list[Balance]:
        if fresh:
            await self.flush()
        return await self._balance(tenant, limits, now)

    async def spend(
        self, since: datetime | None, until: datetime | None, tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]:  # fmt: skip
        await self.flush()
        return await self.rows.spend(since, until, tenant, group_by)

    async def entries(self, request_id: str) -> list[LedgerEntry]:
        await self.flush()
        return await self.rows.entries(request_id)

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None:
        await self.rows.record_prices(versions)

    async def price_versions(self) -> list[PriceVersion]:
        return await self.rows.price_versions()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def note_failure(self, exc: StoreUnavailable) -> None:
        """A caller saw the store fail (e.g. an admission): report degraded until a probe
        succeeds, so the gateway fails closed at once instead of on the next flush."""
        self.failing_store = exc.store
        if self.failing_since is None:
            self.failing_since = asyncio.get_running_loop().time()
            self._wake.set()

    # -- internals -------------------------------------------------------------------------

    def _enqueue(self, op: Op) -> None:
        if self._closed:
            raise RuntimeError("ledger is closed; usage not recorded")
        if op.reservation is not None:
            self._live.pop(op.reservation.id, None)
        else:
            self._unheld.update({e.tenant for e in op.entries})
        self._pending.append(op)
        self._wake.set()

    async def _spool_pending(self) -> None:
        if self._spool is None:
            return
        fresh = [op for op in self._pending if not op.spooled]
        try:
            await self._spool.append([op.to_json() for op in fresh])
        except OSError as exc:
            log.error("ledger spool write failed", extra={"error": type(exc).__name__})
            return
        for op in fresh:
            op.spooled = True

    async def _adopt_orphans(self) -> None:
        assert self._spool is not None
        for line in await self._spool.adopt_orphans():
            op = Op.from_json(line)
            if op.reservation is None:
                self._unheld.update({e.tenant for e in op.entries})
            self._pending.append(op)

    def _held_ids(self) -> list[str]:
        """Every reservation this process must keep alive: open ones and queued settles."""
        ids = list(self._live)
        ids.extend(op.reservation.id for op in self._pending if op.reservation is not None)
        return ids

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renew_every = self.reservation_ttl_s / 3
        next_renew = loop.time() + renew_every
        next_reap = loop.time() + min(renew_every, 5.0)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.failing_since is not None:
                # Degraded: probe every tick, so recovery is noticed at once (no restart).
                await asyncio.shield(self._guarded("probe", self.check()))
            # Shielded: close() cancelling this task never interrupts a write midway.
            if self._pending and self.failing_since is None:
                await asyncio.shield(self._guarded("flush", self.flush()))
            now = loop.time()
            if now >= next_renew:
                next_renew = now + renew_every
                ids = self._held_ids()
                if ids:
                    expires = time.time() + self.reservation_ttl_s
                    await asyncio.shield(self._guarded("renew", self._renew(ids, expires)))
            if now >= next_reap:
                next_reap = now + min(renew_every, 5.0)
                await asyncio.shield(self._guarded("reap", self._reap()))

    async def _reap(self) -> None:
        claimed = await self._claim_expired(time.time(), self.reservation_ttl_s, self.REAP_BATCH)
        if self._spool is not None:
            await self._adopt_orphans()
        if claimed:
            log.warning(
                "booked abandoned reservations at their worst case",
                extra={"store": self.store_name, "reservations": len(claimed)},
            )
            for res in claimed:
                self._enqueue(Op(res, [expired_entry(res)]))

    async def _guarded(self, what: str, work: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            await work
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("ledger background %s failed", what)
                return
            now = loop.time()
            self.failing_store = exc.store
            if self.failing_since is None:
                self.failing_since = now
            if now - self._last_failure_log >= self.FAILURE_LOG_EVERY_S:
                self._last_failure_log = now
                log.warning(
                    "ledger store unavailable; writes kept and spooled for retry",
                    extra={"store": exc.store, "during": what, "queued_ops": len(self._pending)},
                )
        else:
            if self.failing_since is not None and what in ("flush", "probe"):
                log.info(
                    "ledger store recovered",
                    extra={"store": self.store_name, "after_s": round(loop.time() - self.failing_since, 1)},
                )
                self.failing_since = None
