"""``PostgresLedger``: reservations and rows in PostgreSQL, for replicas without Redis.

Every budget change of a tenant runs under that tenant's transaction-scoped advisory lock:
admission is one call of the ``gw_budget_reserve`` function (load missing windows from the
rows, check every cap, hold), and a batch of settles is one transaction that inserts the
rows (primary key drops replays), counts only the new ones and drops the holds. Rows and
counters change in the same transaction, so they can never disagree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from budgets._codec import ref_from_json, ref_to_json
from budgets._ops import Op, unique_entries
from budgets._pgpool import PgPool
from budgets._rows import PgRowStore, insert_rows
from budgets._shared import SharedLedger
from budgets.ledger import (
    Balance,
    BudgetExceeded,
    BudgetLimit,
    LedgerEntry,
    Reservation,
)
from budgets.windows import WINDOWS, window_end, window_key, window_start

__all__ = ["PostgresLedger"]

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('gw-budget:' || t, 0)) FROM unnest(%s::text[]) AS t"
_ADD_SPENT = (
    "UPDATE budget_counters c SET spent_tokens = c.spent_tokens + v.t, spent_usd = c.spent_usd + v.u"
    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::numeric[]) AS v(tenant, wkey, t, u)"
    " WHERE c.tenant = v.tenant AND c.window_key = v.wkey"
)
_DROP_HELD = (
    "UPDATE budget_counters c SET held_tokens = c.held_tokens - v.t, held_usd = c.held_usd - v.u"
    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::numeric[]) AS v(tenant, wkey, t, u)"
    " WHERE c.tenant = v.tenant AND c.window_key = v.wkey"
)


def _bounds(limits: Sequence[BudgetLimit], now: datetime) -> tuple[list[str], list[Any], list[Any]]:
    keys = [window_key(lim.window, now) for lim in limits]
    starts = [window_start(lim.window, now) for lim in limits]
    ends = [window_end(lim.window, now) for lim in limits]
    return keys, starts, ends


class PostgresLedger(SharedLedger):
    store_name = "postgresql"

    def __init__(
        self,
        pool: PgPool,
        *,
        spool_dir: str | None = None,
        flush_interval_s: float = 0.05,
        batch_size: int = 500,
        reservation_ttl_s: float = 600.0,
    ) -> None:
        super().__init__(
            spool_dir=spool_dir, flush_interval_s=flush_interval_s, batch_size=batch_size,
            reservation_ttl_s=reservation_ttl_s,
        )  # fmt: skip
        self.pool = pool
        self.rows = PgRowStore(pool)

    async def _open(self) -> None:
        await self.pool.open()

    async def _close(self) -> None:
        await self.pool.close()

    async def check(self) -> None:
        await self.pool.check()

    async def _reserve(
        self, res: Reservation, limits: Sequence[BudgetLimit], now: datetime, expires_at: float
    ) -> None:
        keys, starts, ends = _bounds(limits, now)
        params = (
            res.tenant, keys, starts, ends, [lim.max_tokens for lim in limits],
            [lim.max_usd for lim in limits], res.tokens, res.usd, res.id, now,
            datetime.fromtimestamp(expires_at, UTC), Jsonb(ref_to_json(res.ref)),
        )  # fmt: skip

        async def call(conn: psycopg.AsyncConnection) -> tuple[str, int, Decimal]:
            cur = await conn.execute(
                "SELECT kind, idx, used FROM gw_budget_reserve(%s, %s::text[], %s::timestamptz[],"
                " %s::timestamptz[], %s::bigint[], %s::numeric[], %s, %s, %s, %s, %s, %s)",
                params,
            )
            row = await cur.fetchone()
            assert row is not None
            return str(row[0]), int(row[1]), Decimal(row[2])

        kind, idx, used = await self.pool.run(call)
        if kind == "ok":
            return
        lim = limits[idx - 1]
        if kind == "tokens":
            raise BudgetExceeded(lim.window, "tokens", lim.max_tokens or 0, int(used))
        raise BudgetExceeded(lim.window, "usd", lim.max_usd or 0, used)

    async def _apply(self, ops: list[Op]) -> None:
        unique = unique_entries(ops)
        drops = sorted({op.reservation.id for op in ops if op.reservation is not None})
        tenants = sorted({e.tenant for e in unique.values()} | {
            op.reservation.tenant for op in ops if op.reservation is not None})  # fmt: skip

        async def apply(conn: psycopg.AsyncConnection) -> None:
            async with conn.transaction():
                await conn.execute(_LOCK, (tenants,))
                new = await insert_rows(conn, list(unique.values())) if unique else []
                if new:
                    await conn.execute(_ADD_SPENT, _spent_columns(new))
                if drops:
                    cur = await conn.execute(
                        "DELETE FROM budget_reservations WHERE id = ANY(%s)"
                        " RETURNING tenant, tokens, usd, window_keys",
                        (drops,),
                    )
                    held = await cur.fetchall()
                    if held:
                        await conn.execute(_DROP_HELD, _held_columns(held))

        await self.pool.run(apply)

    async def _renew(self, ids: list[str], expires_at: float) -> None:
        async def renew(conn: psycopg.AsyncConnection) -> None:
            await conn.execute(
                "UPDATE budget_reservations SET expires_at = %s WHERE id = ANY(%s)",
                (datetime.fromtimestamp(expires_at, UTC), ids),
            )

        await self.pool.run(renew)

    async def _claim_expired(self, now: float, lease_s: float, limit: int) -> list[Reservation]:
        sql = (
            "UPDATE budget_reservations SET expires_at = %s WHERE id IN ("
            " SELECT id FROM budget_reservations WHERE expires_at < %s ORDER BY expires_at"
            " LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, tenant, tokens, usd, window_keys, created_at, ref"
        )
        lease = datetime.fromtimestamp(now + lease_s, UTC)

        async def claim(conn: psycopg.AsyncConnection) -> list[Reservation]:
            cur = await conn.execute(sql, (lease, datetime.fromtimestamp(now, UTC), limit))
            return [
                Reservation(
                    id=r[0], tenant=r[1], tokens=int(r[2]), usd=Decimal(r[3]),
                    window_keys=tuple(r[4]), created_at=r[5],
                    ref=ref_from_json(r[6] if not isinstance(r[6], (str, bytes)) else orjson.loads(r[6])),
                )
                for r in await cur.fetchall()
            ]

        return await self.pool.run(claim)

    async def _balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime
    ) -> list[Balance]:
        keys, starts, ends = _bounds(limits, now)

        async def read(conn: psycopg.AsyncConnection) -> dict[str, tuple[Any, ...]]:
            async with conn.transaction():
                await conn.execute(
                    "SELECT gw_budget_ensure(%s, %s::text[], %s::timestamptz[], %s::timestamptz[])",
                    (tenant, keys, starts, ends),
                )
                cur = await conn.execute(
                    "SELECT window_key, spent_tokens, spent_usd, held_tokens, held_usd"
                    " FROM budget_counters WHERE tenant = %s AND window_key = ANY(%s)",
                    (tenant, keys),
                )
                return {r[0]: tuple(r[1:]) for r in await cur.fetchall()}

        rows = await self.pool.run(read) if keys else {}
        out = []
        for lim, key in zip(limits, keys):
            st, su, ht, hu = rows[key]
            out.append(Balance(
                window=lim.window, window_key=key, max_tokens=lim.max_tokens,
                max_usd=lim.max_usd, spent_tokens=int(st), spent_usd=Decimal(su),
                reserved_tokens=int(ht), reserved_usd=Decimal(hu),
            ))  # fmt: skip
        return out



def _spent_columns(new: list[LedgerEntry]) -> tuple[list[str], list[str], list[int], list[Decimal]]:
    totals: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for e in new:
        for window in WINDOWS:
            t = totals[(e.tenant, window_key(window, e.ts))]
            t[0] += e.total_tokens
            t[1] += e.cost_usd
    return _columns(totals)


def _held_columns(held: list[Any]) -> tuple[list[str], list[str], list[int], list[Decimal]]:
    totals: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for tenant, tokens, usd, keys in held:
        for key in dict.fromkeys(keys):  # a window named by two limits was held once
            t = totals[(tenant, key)]
            t[0] += int(tokens)
            t[1] += Decimal(usd)
    return _columns(totals)


def _columns(
    totals: dict[tuple[str, str], list[Any]],
) -> tuple[list[str], list[str], list[int], list[Decimal]]:
    items = sorted(totals.items())
    return (
        [k[0] for k, _ in items],
        [k[1] for k, _ in items],
        [v[0] for _, v in items],
        [v[1] for _, v in items],
    )
