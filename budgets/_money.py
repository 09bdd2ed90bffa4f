"""USD as integer units of ``COST_QUANTUM`` (1e-10 USD), for stores that count in integers.

Every cost is already a multiple of the quantum, so sums of units are exact. Caps are
rounded down to a whole unit, so a rounded cap can only be stricter than the configured one.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from budgets.pricing import COST_QUANTUM

_PLACES = 10  # COST_QUANTUM == 1e-10


def to_units(usd: Decimal, *, round_up: bool = True) -> int:
    """Whole units covering ``usd`` (rounded up, so a hold never covers less than asked)."""
    rounding = ROUND_CEILING if round_up else ROUND_FLOOR
    return int(usd.quantize(COST_QUANTUM, rounding=rounding).scaleb(_PLACES))


def cap_units(usd: Decimal) -> int:
    return to_units(usd, round_up=False)


def from_units(units: int) -> Decimal:
    return Decimal(units).scaleb(-_PLACES)
