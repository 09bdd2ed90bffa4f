"""``RedisLedger``: reservations as atomic Lua scripts over per-tenant, per-window counters
in Redis, shared by every replica; durable rows in a ``RowStore`` (PostgreSQL, or SQLite
for several workers on one host).

Admission is one Lua call (check every cap, hold). Settles are applied in batches, rows
first: stage one inserts the rows (the row store's primary key drops replays and says
which rows are new), stage two is one Lua call that drops the holds and counts only the
new rows. Because rows are durable before they are counted, a window rebuilt from the
rows (first use, or after Redis lost its data) never misses settled spend.

Counters are loaded lazily: a window missing in Redis is summed from the rows and
installed if still absent, with an expiry one grace period after the window ends.
Redis must be a single primary (not Cluster): scripts touch keys they compute.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from budgets import _lua
from budgets._codec import reservation_from_json, reservation_to_json
from budgets._money import cap_units, from_units, to_units
from budgets._ops import Op, unique_entries
from budgets._rows import RowStore
from budgets._shared import SharedLedger
from budgets.ledger import (
    Balance,
    BudgetExceeded,
    BudgetLimit,
    Reservation,
    StoreUnavailable,
)
from budgets.windows import WINDOWS, window_end, window_key, window_start

__all__ = ["RedisLedger", "redis_client"]

STORE = "redis"
#: What makes Redis unavailable: unreachable, too slow, or answering with an error (OOM,
#: READONLY replica, a script error, ...). A ``DataError`` (an argument it cannot take) is a
#: bug and propagates.
_FAILURES = (RedisConnectionError, RedisTimeoutError, ResponseError, InvalidResponse, OSError)
#: Counters live this long after their window ends (late settles still find them).
KEY_GRACE = timedelta(hours=1)
APPLIED_MARKER_TTL_S = 86_400


def redis_client(url: str, *, max_connections: int = 64, timeout_s: float = 2.0) -> aioredis.Redis:
    """A client that fails fast (one immediate retry, for connections gone stale)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


class RedisLedger(SharedLedger):
    store_name = "redis"

    def __init__(
        self,
        redis_url: str,
        rows: RowStore,
        *,
        prefix: str = "gw",
        spool_dir: str | None = None,
        flush_interval_s: float = 0.05,
        batch_size: int = 500,
        reservation_ttl_s: float = 600.0,
    ) -> None:
        super().__init__(
            spool_dir=spool_dir, flush_interval_s=flush_interval_s, batch_size=batch_size,
            reservation_ttl_s=reservation_ttl_s,
        )  # fmt: skip
        self.rows = rows
        self.prefix = prefix
        self._redis = redis_client(redis_url)
        self._scripts = {
            name: self._redis.register_script(src)
            for name, src in (("reserve", _lua.RESERVE), ("install", _lua.INSTALL),
                              ("apply", _lua.APPLY), ("claim", _lua.CLAIM))
        }  # fmt: skip
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._batches = 0

    # -- plumbing --------------------------------------------------------------------------

    async def _call(self, script: str, args: list[Any]) -> Any:
        try:
            return await self._scripts[script](args=args)
        except _FAILURES as exc:
            raise StoreUnavailable(STORE, type(exc).__name__) from exc

    def _counter(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:b:{tenant}:{key}"

    async def _open(self) -> None:
        await self.rows.open()

    async def _close(self) -> None:
        try:
            await self._redis.aclose()
        finally:
            await self.rows.close()

    async def check(self) -> None:
        """Redis answers and takes writes (one that is out of memory or a replica does not)."""
        try:
            await self._redis.set(f"{self.prefix}:probe", self.instance, px=60_000)
        except _FAILURES as exc:
            raise StoreUnavailable(STORE, type(exc).__name__) from exc
        await self.rows.check()

    # -- admission -------------------------------------------------------------------------

    async def _reserve(
        self, res: Reservation, limits: Sequence[BudgetLimit], now: datetime, expires_at: float
    ) -> None:
        args: list[Any] = [self.prefix, res.tenant, len(limits)]
        for lim in limits:
            args += [
                window_key(lim.window, now),
                "" if lim.max_tokens is None else lim.max_tokens,
                "" if lim.max_usd is None else cap_units(lim.max_usd),
            ]
        units = to_units(res.usd)
        record = {
            "keys": [self._counter(res.tenant, k) for k in res.window_keys],
            "t": str(res.tokens), "u": str(units), "res": reservation_to_json(res),
        }  # fmt: skip
        args += [res.tokens, units, res.id, int(expires_at * 1000), orjson.dumps(record)]
        for _ in range(len(limits) + 2):
            reply = await self._call("reserve", args)
            outcome = reply[0].decode()
            if outcome == "ok":
                return
            lim = limits[int(reply[1]) - 1]
            if outcome == "load":
                await self._ensure_loaded(res.tenant, lim.window, now)
                continue
            used = int(reply[2])
            if outcome == "tokens":
                raise BudgetExceeded(lim.window, "tokens", lim.max_tokens or 0, used)
            raise BudgetExceeded(lim.window, "usd", lim.max_usd or 0, from_units(used))
        raise StoreUnavailable(STORE, "budget window keeps disappearing")

    async def _ensure_loaded(self, tenant: str, window: str, now: datetime) -> None:
        slot = (tenant, window_key(window, now))
        loading = self._loading.get(slot)
        if loading is None:
            loading = asyncio.ensure_future(self._load(tenant, window, now))
            self._loading[slot] = loading
            loading.add_done_callback(lambda f: self._loading.pop(slot, None) and None)
        await asyncio.shield(loading)

    async def _load(self, tenant: str, window: str, now: datetime) -> None:
        end = window_end(window, now)
        tokens, usd = await self.rows.window_totals(tenant, window_start(window, now), end)
        ttl_ms = 0
        if end is not None:
            ttl_ms = int(((end + KEY_GRACE) - now).total_seconds() * 1000)
            ttl_ms = max(ttl_ms, int(self.reservation_ttl_s * 2000))
        key = self._counter(tenant, window_key(window, now))
        await self._call("install", [key, tokens, to_units(usd), ttl_ms])

    # -- batched settlement ----------------------------------------------------------------

    async def _apply(self, ops: list[Op]) -> None:
        fresh = [op for op in ops if op.new is None]
        if fresh:
            await self._store_rows(fresh)
        by_batch: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_batch[op.batch or ""].append(op)
        for batch, group in by_batch.items():
            await self._call("apply", self._apply_args(batch, group))

    async def _store_rows(self, ops: list[Op]) -> None:
        unique = unique_entries(ops)
        new = {(e.request_id, e.attempt) for e in await self.rows.insert(list(unique.values()))}
        self._batches += 1
        batch = f"{self.instance}-{self._batches}"
        for op in ops:
            op.new = []
            for e in op.entries:
                if (e.request_id, e.attempt) in new:
                    new.discard((e.request_id, e.attempt))  # count each row once
                    op.new.append(e)
            op.batch = batch

    def _apply_args(self, batch: str, ops: list[Op]) -> list[Any]:
        drops = [op.reservation.id for op in ops if op.reservation is not None]
        spent: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for op in ops:
            for e in op.new or ():
                units = to_units(e.cost_usd)
                for window in WINDOWS:
                    totals = spent[self._counter(e.tenant, window_key(window, e.ts))]
                    totals[0] += e.total_tokens
                    totals[1] += units
        args: list[Any] = [self.prefix, batch, APPLIED_MARKER_TTL_S, len(drops), *drops, len(spent)]
        for key, (tokens, units) in spent.items():
            args += [key, tokens, units]
        return args

    # -- expiry ----------------------------------------------------------------------------

    async def _renew(self, ids: list[str], expires_at: float) -> None:
        score = int(expires_at * 1000)
        try:
            for i in range(0, len(ids), 1000):
                chunk = ids[i : i + 1000]
                await self._redis.zadd(f"{self.prefix}:rexp", dict.fromkeys(chunk, score), xx=True)
        except _FAILURES as exc:
            raise StoreUnavailable(STORE, type(exc).__name__) from exc

    async def _claim_expired(self, now: float, lease_s: float, limit: int) -> list[Reservation]:
        raw = await self._call("claim", [self.prefix, int(now * 1000), int(lease_s * 1000), limit])
        return [reservation_from_json(orjson.loads(r)["res"]) for r in raw]

    # -- reads -----------------------------------------------------------------------------

    async def _balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime
    ) -> list[Balance]:
        keys = [window_key(lim.window, now) for lim in limits]
        values = await self._read_counters(tenant, keys)
        if any(v is None for v in values):
            for lim, v in zip(limits, values):
                if v is None:
                    await self._ensure_loaded(tenant, lim.window, now)
            values = await self._read_counters(tenant, keys)
        out: list[Balance] = []
        for lim, key, v in zip(limits, keys, values):
            st, su, ht, hu = v or (0, 0, 0, 0)
            out.append(Balance(
                window=lim.window, window_key=key, max_tokens=lim.max_tokens,
                max_usd=lim.max_usd, spent_tokens=st, spent_usd=from_units(su),
                reserved_tokens=ht, reserved_usd=from_units(hu),
            ))  # fmt: skip
        return out

    async def _read_counters(
        self, tenant: str, keys: Sequence[str]
    ) -> list[tuple[int, int, int, int] | None]:
        """Every counter in one round trip; None for a window not loaded in Redis."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self._counter(tenant, key), ["st", "su", "ht", "hu"])
                replies = await pipe.execute()
        except _FAILURES as exc:
            raise StoreUnavailable(STORE, type(exc).__name__) from exc
        return [
            None if st is None else (int(st), int(su), int(ht or 0), int(hu or 0))
            for st, su, ht, hu in replies
        ]
