"""Budget ledger: the types every ledger speaks, and the ``Ledger`` protocol.

A request's life against a ledger: ``balance`` (what is left, for the routing policy),
``reserve`` (hold the estimated tokens and USD; raises ``BudgetExceeded``), then after the
upstream call either ``settle`` (drop the hold, add the actual usage rows) or ``release``
(drop the hold, nothing spent). ``SqliteLedger`` is the embedded implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, runtime_checkable

from budgets.pricing import PriceVersion, as_decimal
from budgets.windows import WINDOWS

__all__ = [
    "GROUP_BY_FIELDS",
    "Balance",
    "BudgetExceeded",
    "BudgetLimit",
    "Ledger",
    "LedgerEntry",
    "RequestRef",
    "Reservation",
    "SpendRow",
    "SqliteLedger",
    "StoreUnavailable",
]

#: What ``Ledger.spend`` can group by.
GROUP_BY_FIELDS: tuple[str, ...] = ("tenant", "model", "day")


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """A cap on one window kind (see ``budgets.windows.WINDOWS``); None means uncapped."""

    window: str
    max_tokens: int | None = None
    max_usd: Decimal | None = None

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(
                f"unknown budget window {self.window!r}; expected one of {', '.join(WINDOWS)}"
            )
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be non-negative")
        if self.max_usd is not None:
            # Config loaders may pass ints or floats; keep an exact Decimal.
            max_usd = as_decimal(self.max_usd)
            if not max_usd.is_finite() or max_usd < 0:
                raise ValueError("max_usd must be a finite, non-negative amount")
            object.__setattr__(self, "max_usd", max_usd)


@dataclass(frozen=True, slots=True)
class RequestRef:
    """Who a reservation is for: what a shared ledger books if the holder dies (see
    ``expired_entry``)."""

    request_id: str
    key_id: str | None = None
    model: str = "-"
    provider: str = "-"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens and USD held against ``window_keys`` of ``tenant`` until settled or released."""

    id: str
    tenant: str
    tokens: int
    usd: Decimal
    window_keys: tuple[str, ...]
    created_at: datetime
    ref: RequestRef | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One upstream attempt's actual usage. ``input_tokens`` excludes cached input (reads).

    ``cache_write_tokens`` is the part of ``input_tokens`` written to a provider cache (so
    totals never count it twice); ``usage_raw`` is the provider's usage object as reported,
    stored with its numbers only (never content). ``price_version`` names the rates charged
    (see ``Ledger.price_versions``).
    """

    request_id: str
    attempt: int
    ts: datetime
    tenant: str
    key_id: str | None
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: Decimal
    usage_estimated: bool
    status: str
    price_version: str = "config"
    cache_write_tokens: int = 0
    usage_raw: dict[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Balance:
    """Where one tenant stands against one limit in the current period of its window."""

    window: str
    window_key: str
    max_tokens: int | None
    max_usd: Decimal | None
    spent_tokens: int
    spent_usd: Decimal
    reserved_tokens: int
    reserved_usd: Decimal

    @property
    def remaining_tokens(self) -> int | None:
        """Tokens still available (never negative); None when tokens are uncapped."""
        if self.max_tokens is None:
            return None
        return max(0, self.max_tokens - self.spent_tokens - self.reserved_tokens)

    @property
    def remaining_usd(self) -> Decimal | None:
        """USD still available (never negative); None when USD is uncapped."""
        if self.max_usd is None:
            return None
        return max(Decimal(0), self.max_usd - self.spent_usd - self.reserved_usd)


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One line of a spend report. ``requests`` counts distinct request ids."""

    group: dict[str, str]
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: Decimal


class StoreUnavailable(Exception):
    """A shared store (Redis, PostgreSQL) could not be reached; callers fail closed."""

    def __init__(self, store: str, detail: str = "") -> None:
        self.store = store
        self.detail = detail
        super().__init__(f"{store} unavailable" + (f" ({detail})" if detail else ""))


class BudgetExceeded(Exception):
    """A reservation would take a tenant past a limit. The message is safe to show callers."""

    def __init__(
        self,
        window: str,
        kind: Literal["tokens", "usd"],
        limit: int | Decimal,
        used: int | Decimal,
    ) -> None:
        self.window = window
        self.kind = kind
        self.limit = limit
        self.used = used
        if kind == "tokens":
            message = f"{window} token budget exhausted ({limit} tokens)"
        else:
            message = f"{window} USD budget exhausted ({limit} USD)"
        super().__init__(message)

    def __reduce__(
        self,
    ) -> tuple[type[BudgetExceeded], tuple[str, str, int | Decimal, int | Decimal]]:
        return (type(self), (self.window, self.kind, self.limit, self.used))


@runtime_checkable
class Ledger(Protocol):
    """Budget accounting. Every implementation passes tests/budgets/test_ledger_contract.py."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop background work and persist everything still pending."""
        ...

    async def balance(
        self, tenant: str, limits: Sequence[BudgetLimit], now: datetime, *, fresh: bool = True
    ) -> list[Balance]:
        """One ``Balance`` per limit, in the order given. ``fresh=False`` may skip applying
        this process's queued settles first (a cheaper read, for routing hints)."""
        ...

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
        """Hold ``tokens``/``usd`` in the windows containing ``now``; raise ``BudgetExceeded``
        if spent + reserved + this would be strictly greater than any cap. Limits with no
        cap never reject. ``ref`` names the request (shared ledgers book an abandoned
        reservation at its worst case under that request id)."""
        ...

    async def settle(
        self, reservation: Reservation, entries: Sequence[LedgerEntry]
    ) -> None:
        """Drop the hold and record the actual usage. Idempotent per (request_id, attempt)."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Drop the hold; nothing is spent."""
        ...

    async def record(self, entries: Sequence[LedgerEntry]) -> None:
        """Record usage that had no reservation. Idempotent per (request_id, attempt)."""
        ...

    async def flush(self) -> None:
        """Persist every queued row now."""
        ...

    async def check(self) -> None:
        """Raise ``StoreUnavailable`` if a store this ledger needs cannot be reached."""
        ...

    async def claim_alert(self, tenant: str, window_key: str, fraction: str) -> bool:
        """True exactly once per (tenant, window key, fraction), across every replica."""
        ...

    async def spend(
        self,
        since: datetime | None,
        until: datetime | None,
        tenant: str | None,
        group_by: Sequence[str],
    ) -> list[SpendRow]:
        """Totals of rows with ``since <= ts < until``, grouped by ``GROUP_BY_FIELDS``."""
        ...

    async def entries(self, request_id: str) -> list[LedgerEntry]:
        """The recorded rows of one request (queued ones written first), by attempt."""
        ...

    async def record_prices(self, versions: Sequence[PriceVersion]) -> None:
        """Keep the rates of each price version; a version already stored is left as is."""
        ...

    async def price_versions(self) -> list[PriceVersion]:
        """Every stored price version, by version name."""
        ...


def expired_entry(reservation: Reservation) -> LedgerEntry:
    """The row booked for a reservation whose holder stopped renewing it: its worst case.

    Attempt 0 is reserved for it (real attempts are numbered from 1), so it never collides
    with the request's own rows; all tokens are booked as input since the split is unknown.
    """
    ref = reservation.ref or RequestRef(request_id=reservation.id)
    return LedgerEntry(
        request_id=ref.request_id,
        attempt=0,
        ts=reservation.created_at,
        tenant=reservation.tenant,
        key_id=ref.key_id,
        model=ref.model,
        provider=ref.provider,
        input_tokens=reservation.tokens,
        output_tokens=0,
        cached_input_tokens=0,
        cost_usd=reservation.usd,
        usage_estimated=True,
        status="reservation_expired",
        price_version="reservation",
    )


# Re-exported so ``from budgets.ledger import SqliteLedger`` works; imported last because
# budgets.sqlite_ledger needs the types above.
from budgets.sqlite_ledger import SqliteLedger
