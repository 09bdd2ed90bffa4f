"""Budgets: pricing, the spend ledger, and rate limits. Imports nothing from the gateway."""

# budgets.ledger first: it re-exports SqliteLedger, whose module needs its types.
from budgets.ledger import (
    GROUP_BY_FIELDS,
    Balance,
    BudgetExceeded,
    BudgetLimit,
    Ledger,
    LedgerEntry,
    Reservation,
    SpendRow,
)
from budgets.pricing import Price, cost
from budgets.ratelimit import RateLimiter, RateLimits, RateState
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
    "Price",
    "RateLimiter",
    "RateLimits",
    "RateState",
    "Reservation",
    "SpendRow",
    "SqliteLedger",
    "cost",
    "window_end",
    "window_key",
    "window_start",
]
