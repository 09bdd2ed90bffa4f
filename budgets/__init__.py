"""Budgets: pricing, the spend ledger, and rate limits. Imports nothing from the gateway."""

# budgets.ledger first: it re-exports SqliteLedger, whose module needs its types.
from budgets._pgpool import PgPool
from budgets._rows import PgRowStore, RowStore, SqliteRowStore
from budgets.ledger import (
    GROUP_BY_FIELDS,
    Balance,
    BudgetExceeded,
    BudgetLimit,
    Ledger,
    LedgerEntry,
    RequestRef,
    Reservation,
    SpendRow,
    StoreUnavailable,
    expired_entry,
)
from budgets.postgres_ledger import PostgresLedger
from budgets.pricing import Price, PriceVersion, cost, price_version
from budgets.ratelimit import RateLimiter, RateLimits, RateState
from budgets.redis_ledger import RedisLedger, redis_client
from budgets.spool import Spool
from budgets.sqlite_ledger import SqliteLedger
from budgets.windows import WINDOWS, window_end, window_key, window_start

__all__ = [
    "GROUP_BY_FIELDS",
    "WINDOWS",
    "Balance",
    "BudgetExceeded",
    "BudgetLimit",
    "Ledger",
    "LedgerEntry",
    "PgPool",
    "PgRowStore",
    "PostgresLedger",
    "Price",
    "PriceVersion",
    "RateLimiter",
    "RateLimits",
    "RateState",
    "RedisLedger",
    "RequestRef",
    "Reservation",
    "RowStore",
    "SpendRow",
    "Spool",
    "SqliteLedger",
    "SqliteRowStore",
    "StoreUnavailable",
    "cost",
    "expired_entry",
    "price_version",
    "redis_client",
    "window_end",
    "window_key",
    "window_start",
]
