from datetime import UTC, datetime, timedelta, timezone

import pytest

from budgets import WINDOWS, window_end, window_key, window_start

T = datetime(2026, 11, 25, 13, 5, 9, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "key", "end"),
    [
        (
            "minute",
            "minute:2026-11-25T13:05",
            datetime(2026, 11, 25, 13, 6, tzinfo=UTC),
        ),
        ("hour", "hour:2026-11-25T13", datetime(2026, 11, 25, 14, tzinfo=UTC)),
        ("day", "day:2026-11-25", datetime(2026, 11, 26, tzinfo=UTC)),
        ("month", "month:2026-11", datetime(2026, 12, 1, tzinfo=UTC)),
        ("total", "total", None),
    ],
)
def test_keys_and_ends(window: str, key: str, end: datetime | None) -> None:
    assert window_key(window, T) == key
    assert window_end(window, T) == end


def test_every_window_is_named() -> None:
    assert WINDOWS == ("minute", "hour", "day", "month", "total")


def test_month_boundary_is_exact_to_the_microsecond() -> None:
    last = datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)
    first = last + timedelta(microseconds=1)
    assert window_key("month", last) == "month:2026-01"
    assert window_key("month", first) == "month:2026-02"
    assert window_key("day", last) == "day:2026-01-31"
    assert window_key("day", first) == "day:2026-02-01"
    assert window_end("month", last) == first
    assert window_start("month", first) == first


def test_year_and_leap_day_boundaries() -> None:
    assert window_end("month", datetime(2026, 12, 31, 23, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert window_end("month", datetime(2028, 2, 15, tzinfo=UTC)) == datetime(
        2028, 3, 1, tzinfo=UTC
    )
    assert window_key("day", datetime(2028, 2, 29, 12, tzinfo=UTC)) == "day:2028-02-29"
    assert window_end("day", datetime(2028, 2, 29, 12, tzinfo=UTC)) == datetime(
        2028, 3, 1, tzinfo=UTC
    )


def test_other_time_zones_are_converted_to_utc() -> None:
    # 01:00 on Dec 1st in UTC+5 is still November 30th in UTC.
    local = datetime(2026, 12, 1, 1, 0, tzinfo=timezone(timedelta(hours=5)))
    assert window_key("day", local) == "day:2026-11-30"
    assert window_key("month", local) == "month:2026-11"
    assert window_end("day", local) == datetime(2026, 12, 1, tzinfo=UTC)


def test_naive_datetimes_are_utc() -> None:
    naive = datetime(2026, 11, 25, 23, 59)
    assert window_key("day", naive) == "day:2026-11-25"
    assert window_end("hour", naive) == datetime(2026, 11, 26, tzinfo=UTC)


def test_start_of_total_is_open() -> None:
    assert window_start("total", T) is None
    assert window_start("hour", T) == datetime(2026, 11, 25, 13, tzinfo=UTC)


@pytest.mark.parametrize("fn", [window_key, window_start, window_end])
def test_unknown_window_is_an_error(fn: object) -> None:
    with pytest.raises(ValueError, match="unknown budget window"):
        fn("week", T)  # type: ignore[operator]
