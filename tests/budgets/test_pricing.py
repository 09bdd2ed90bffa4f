from decimal import Decimal

import pytest

from budgets import Price, cost

D = Decimal


@pytest.mark.parametrize(
    ("price", "tokens", "expected"),
    [
        # (input, output, cached, cache_write)
        (Price(D("0.15"), D("0.60")), (1000, 500, 0, 0), D("0.00045")),
        (
            Price(D("3"), D("15"), D("0.30"), D("3.75")),
            (1000, 100, 2000, 400),
            D("0.0066"),
        ),
        # No cache prices: cached reads and writes fall back to the input price.
        (Price(D("1"), D("2")), (0, 0, 1000, 1000), D("0.002")),
        (
            Price(D("0.5"), D("2"), cached_input_usd_per_mtok=D("0")),
            (0, 0, 10_000, 0),
            D("0"),
        ),
        (Price(), (123_456, 654_321, 1, 1), D("0")),
        # Ten decimal places, half-up: 5e-11 rounds up, 4e-11 rounds down.
        (Price(D("0.00005")), (1, 0, 0, 0), D("0.0000000001")),
        (Price(D("0.00004")), (1, 0, 0, 0), D("0")),
        (Price(D("2.50"), D("10.00")), (1_000_000, 1_000_000, 0, 0), D("12.5")),
    ],
)
def test_cost_table(
    price: Price, tokens: tuple[int, int, int, int], expected: Decimal
) -> None:
    got = cost(price, *tokens)
    assert got == expected
    assert isinstance(got, Decimal)
    assert got.as_tuple().exponent == -10


def test_cost_is_exact_where_floats_drift() -> None:
    price = Price(D("0.1"), D("0.2"))
    total = sum((cost(price, 1_000_000, 1_000_000) for _ in range(10)), D(0))
    assert total == D("3")  # 10 * (0.1 + 0.2), which float arithmetic gets wrong
    assert cost(price, 1, 1) == D("0.0000003")


def test_price_coerces_config_numbers_without_float_noise() -> None:
    price = Price(0.15, 1, "0.075")  # type: ignore[arg-type]
    assert price.input_usd_per_mtok == D("0.15")
    assert price.output_usd_per_mtok == D("1")
    assert price.cached_input_usd_per_mtok == D("0.075")
    assert price.cache_write_usd_per_mtok is None


@pytest.mark.parametrize("bad", [D("-1"), D("NaN"), D("Infinity")])
def test_price_rejects_negative_or_non_finite(bad: Decimal) -> None:
    with pytest.raises(ValueError):
        Price(bad)


def test_cost_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError):
        cost(Price(D("1")), -1, 0)
