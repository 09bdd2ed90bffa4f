"""In-memory spent and reserved totals per (tenant, window key), for one process.

Invariant kept by ``SqliteLedger``: for every loaded window, ``spent`` equals the sum of
the ledger rows of that tenant whose ``ts`` falls in the window, counting both rows already
in the database and rows still queued for it. Windows that are not loaded are simply
absent; they are (re)built from the database plus the queue the next time they are used.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal

from budgets.ledger import Balance, BudgetExceeded, BudgetLimit, LedgerEntry
from budgets.windows import window_key

_ZERO = Decimal(0)
Slot = tuple[str, str]  # (tenant, window key)


class _Spent:
    __slots__ = ("end", "tokens", "usd")

    def __init__(self, tokens: int, usd: Decimal, end: datetime | None) -> None:
        self.tokens = tokens
        self.usd = usd
        self.end = end


class _Held:
    __slots__ = ("tokens", "usd")

    def __init__(self) -> None:
        self.tokens = 0
        self.usd = _ZERO


class WindowBook:
    """Plain synchronous counters; callers make each check-and-update await-free."""

    def __init__(self) -> None:
        self._spent: dict[Slot, _Spent] = {}
        self._held: dict[Slot, _Held] = {}
        # Window kinds ever loaded per tenant: which keys a new row can possibly touch.
        self._kinds: dict[str, set[str]] = {}

    def is_loaded(self, tenant: str, key: str) -> bool:
        return (tenant, key) in self._spent

    def install(
        self,
        tenant: str,
        window: str,
        key: str,
        end: datetime | None,
        tokens: int,
        usd: Decimal,
    ) -> None:
        self._spent[(tenant, key)] = _Spent(tokens, usd, end)
        self._kinds.setdefault(tenant, set()).add(window)

    def count(self, entry: LedgerEntry, sign: int = 1) -> None:
        """Add (or with ``sign=-1`` take back) one row in every loaded window it falls in."""
        kinds = self._kinds.get(entry.tenant)
        if not kinds:
            return
        tokens = entry.total_tokens
        for kind in kinds:
            spent = self._spent.get((entry.tenant, window_key(kind, entry.ts)))
            if spent is not None:
                spent.tokens += sign * tokens
                spent.usd += entry.cost_usd if sign > 0 else -entry.cost_usd

    def check(
        self, tenant: str, limit: BudgetLimit, key: str, tokens: int, usd: Decimal
    ) -> None:
        """Raise ``BudgetExceeded`` if holding ``tokens``/``usd`` more would pass a cap."""
        spent = self._spent[(tenant, key)]
        held = self._held.get((tenant, key))
        used_tokens = spent.tokens + (held.tokens if held else 0)
        if limit.max_tokens is not None and used_tokens + tokens > limit.max_tokens:
            raise BudgetExceeded(limit.window, "tokens", limit.max_tokens, used_tokens)
        used_usd = spent.usd + (held.usd if held else _ZERO)
        if limit.max_usd is not None and used_usd + usd > limit.max_usd:
            raise BudgetExceeded(limit.window, "usd", limit.max_usd, used_usd)

    def hold(self, tenant: str, keys: Iterable[str], tokens: int, usd: Decimal) -> None:
        for key in keys:
            held = self._held.get((tenant, key))
            if held is None:
                held = self._held[(tenant, key)] = _Held()
            held.tokens += tokens
            held.usd += usd

    def unhold(
        self, tenant: str, keys: Iterable[str], tokens: int, usd: Decimal
    ) -> None:
        for key in keys:
            held = self._held.get((tenant, key))
            if held is None:
                continue
            held.tokens -= tokens
            held.usd -= usd
            if held.tokens <= 0 and held.usd <= _ZERO:
                del self._held[(tenant, key)]

    def balance(self, tenant: str, limit: BudgetLimit, key: str) -> Balance:
        spent = self._spent[(tenant, key)]
        held = self._held.get((tenant, key))
        return Balance(
            window=limit.window,
            window_key=key,
            max_tokens=limit.max_tokens,
            max_usd=limit.max_usd,
            spent_tokens=spent.tokens,
            spent_usd=spent.usd,
            reserved_tokens=held.tokens if held else 0,
            reserved_usd=held.usd if held else _ZERO,
        )

    def prune(self, now: datetime, grace: timedelta) -> int:
        """Forget windows that ended more than ``grace`` before ``now``; returns how many.

        Always safe: a forgotten window is rebuilt from the database and queue if used again.
        """
        cutoff = now - grace
        stale = [
            slot
            for slot, s in self._spent.items()
            if s.end is not None and s.end < cutoff
        ]
        for slot in stale:
            del self._spent[slot]
        return len(stale)
