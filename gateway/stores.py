"""Which stores a gateway uses, chosen by ``state`` in the config (CONTRACT section 3).

| state                                  | ledger (reservations / rows)        | rate limits |
| -------------------------------------- | ----------------------------------- | ----------- |
| sqlite, no redis (default)             | SqliteLedger (in-process / SQLite)  | in memory   |
| postgresql, no redis                   | PostgresLedger (row locks / PG)     | in memory   |
| redis + postgresql (several replicas)  | RedisLedger (Lua / PG)              | Redis       |
| redis + sqlite (--workers N, one host) | RedisLedger (Lua / SQLite file)     | Redis       |

Redis reservations were chosen over PostgreSQL row locks by measurement (bench/budget_overhead.py):
admission is one Lua round trip instead of one locked transaction. Without Redis, the
in-memory rate limits are per process, which is why ``serve --workers N`` needs Redis.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime

from budgets import (
    Ledger,
    PgPool,
    PgRowStore,
    PostgresLedger,
    Price,
    PriceVersion,
    RateLimiter,
    RateLimits,
    RedisLedger,
    SpendRow,
    SqliteLedger,
    SqliteRowStore,
    StoreUnavailable,
    price_version,
)
from gateway.config import LoadedConfig
from gateway.db import is_postgres
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.settings import Settings

log = logging.getLogger("gateway.stores")


async def correct_rate_tokens(limiter: RateLimiter, key: str, limits: RateLimits, delta: int,
                              window_end: float | None) -> None:
    """After the answer: move the tokens-per-minute count from the estimate to the actual.
    A store outage here loses only this correction (logged), never the request's settlement."""
    try:
        await limiter.adjust_tokens(key, limits, delta, window_end=window_end)
    except StoreUnavailable as exc:
        log.warning("rate-limit token correction skipped", extra={"store": exc.store, "delta": delta})


#: What a 503 for a store outage asks clients to wait before retrying.
RETRY_AFTER_S = 2


def fail_closed(exc: GatewayError | StoreUnavailable) -> GatewayError:
    """A store that cannot be reached: 503 with retry-after (the request is not admitted)."""
    if isinstance(exc, GatewayError):
        return exc
    return ServiceUnavailable(f"the gateway's {exc.store} store is unavailable; retry shortly",
                              headers={"retry-after": str(RETRY_AFTER_S)})


def ensure_available(ledger: Ledger) -> None:
    """Fail closed while a shared store is known to be down (noticed by the ledger's
    writes, admissions or probes): one attribute read per request, no round trip."""
    if getattr(ledger, "failing_since", None) is not None:
        store = getattr(ledger, "failing_store", None) or "state"
        raise ServiceUnavailable(f"the gateway's {store} store is unavailable; retry shortly",
                                 headers={"retry-after": str(RETRY_AFTER_S)})


def build_ledger(loaded: LoadedConfig, settings: Settings) -> Ledger:
    state = loaded.config.state
    shared = {
        "spool_dir": str(loaded.spool_dir), "flush_interval_s": settings.flush_interval_s,
        "reservation_ttl_s": settings.reservation_ttl_s,
    }  # fmt: skip
    postgres = is_postgres(state.database_url)
    if state.redis_url:
        rows = (PgRowStore(_pool(state.database_url, settings)) if postgres
                else SqliteRowStore(str(loaded.sqlite_path)))
        return RedisLedger(state.redis_url, rows, prefix=state.redis_key_prefix, **shared)  # type: ignore[arg-type]
    if postgres:
        return PostgresLedger(_pool(state.database_url, settings), **shared)  # type: ignore[arg-type]
    return SqliteLedger(str(loaded.sqlite_path), flush_interval_s=settings.flush_interval_s)


def build_limiter(loaded: LoadedConfig, settings: Settings) -> RateLimiter:
    state = loaded.config.state
    if state.redis_url:
        return RateLimiter(state.redis_url, key_prefix=f"{state.redis_key_prefix}-limits",
                           timeout_s=settings.store_timeout_s)
    return RateLimiter("memory://")


def _pool(url: str, settings: Settings) -> PgPool:
    return PgPool(url, timeout_s=settings.store_timeout_s)


async def store_problems(ledger: Ledger, limiter: RateLimiter, timeout_s: float = 2.0) -> list[str]:
    """What /readyz reports: each shared store that does not answer, by name."""
    problems: list[str] = []
    for check in (ledger.check, limiter.check):
        try:
            await asyncio.wait_for(check(), timeout_s)
        except StoreUnavailable as exc:
            problems.append(f"{exc.store}: unavailable (degraded: requests get 503 until it is back)")
        except TimeoutError:
            problems.append("state store: no answer (degraded: requests get 503 until it is back)")
    failing = getattr(ledger, "failing_since", None)
    queued = getattr(ledger, "queued", 0)
    if failing is not None and queued:
        problems.append(f"ledger: {queued} settlements spooled, waiting for the store")
    return problems


async def spend(loaded: LoadedConfig, since: datetime | None, until: datetime | None,
                tenant: str | None, group_by: Sequence[str]) -> list[SpendRow]:
    """The FinOps report straight from the durable rows (what `gateway spend` prints)."""
    url = loaded.config.state.database_url
    if is_postgres(url):
        rows = PgRowStore(PgPool(url))
        await rows.open()
        try:
            return await rows.spend(since, until, tenant, group_by)
        finally:
            await rows.close()
    ledger = SqliteLedger(str(loaded.sqlite_path))
    try:
        return await ledger.spend(since, until, tenant, group_by)
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def reporting_ledger(loaded: LoadedConfig) -> AsyncIterator[Ledger]:
    """A started ledger for one-shot commands (`gateway spend`): the serving one's stores."""
    ledger = build_ledger(loaded, Settings())
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()


async def migrate(loaded: LoadedConfig) -> list[str]:
    """Create or upgrade the PostgreSQL schema (`gateway migrate`); SQLite needs none."""
    url = loaded.config.state.database_url
    if not is_postgres(url):
        return []
    from gateway.db_pg import migrate as migrate_pg

    return await migrate_pg(url)


async def record_prices(ledger: Ledger, prices: Mapping[str, Price]) -> None:
    """Store the rates behind every configured model's price version, once per version, so
    ledger rows stay repriceable. A store that is down only delays this to the next start."""
    versions: dict[str, PriceVersion] = {}
    for model, price in sorted(prices.items()):
        version = price_version(price)
        versions.setdefault(version, PriceVersion(version, model, price))
    try:
        await ledger.record_prices(list(versions.values()))
    except StoreUnavailable as exc:
        log.warning("price versions not recorded: %s", exc)
