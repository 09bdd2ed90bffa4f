"""Model prices and the cost of one call, in exact decimal USD."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

__all__ = ["COST_QUANTUM", "Price", "PriceVersion", "as_decimal", "cost", "price_version"]

#: Every cost is rounded to this many places (ten decimals of a dollar).
COST_QUANTUM = Decimal("1e-10")
_ZERO = Decimal(0)


def as_decimal(value: object) -> Decimal:
    """Convert a config number to Decimal without picking up binary float noise."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"amount must be a number, got {type(value).__name__}")
    return Decimal(str(value))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Cached-input and cache-write prices fall back to the input price."""

    input_usd_per_mtok: Decimal = _ZERO
    output_usd_per_mtok: Decimal = _ZERO
    cached_input_usd_per_mtok: Decimal | None = None
    cache_write_usd_per_mtok: Decimal | None = None

    def __post_init__(self) -> None:
        # Config loaders may hand us ints, strings or (sadly) floats; store exact Decimals.
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            amount = as_decimal(value)
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"{field.name} must be a finite, non-negative amount")
            object.__setattr__(self, field.name, amount)


def cost(
    price: Price,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> Decimal:
    """Exact cost in USD of one call, rounded half-up to 10 decimal places.

    ``input_tokens`` counts only the non-cached input; cached reads and cache writes are
    priced at their own rate when the model has one, otherwise at the input rate.
    """
    if min(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens) < 0:
        raise ValueError("token counts must be non-negative")
    input_rate = price.input_usd_per_mtok
    cached_rate = price.cached_input_usd_per_mtok
    write_rate = price.cache_write_usd_per_mtok
    usd_times_million = (
        input_tokens * input_rate
        + output_tokens * price.output_usd_per_mtok
        + cached_input_tokens * (input_rate if cached_rate is None else cached_rate)
        + cache_write_tokens * (input_rate if write_rate is None else write_rate)
    )
    # scaleb shifts the exponent: an exact division by 10**6, no rounding involved.
    return usd_times_million.scaleb(-6).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


@lru_cache(maxsize=1024)
def price_version(price: Price, source: str = "config") -> str:
    """A stable name for ``price`` (``config:1a2b3c4d5e6f``), stored on every ledger row so
    history can be repriced: rows with the same version were charged the same rates."""
    text = "|".join(str(getattr(price, f.name)) for f in fields(price))
    return f"{source}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """The rates behind one ``price_version``, kept in the ``price_versions`` table so ledger
    rows can be repriced (join ``ledger_entries.price_version`` to ``price_versions.version``).
    ``model`` is the first model seen with these rates; ``first_seen`` is set by the store."""

    version: str
    model: str
    price: Price
    first_seen: datetime | None = None
