"""Budget windows: UTC calendar periods named by a stable key.

A window key (``"day:2026-11-25"``) names one period of one window kind. Counters keyed by
it reset on their own at the boundary, because the next period simply has another key.
Naive datetimes are taken to be UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["WINDOWS", "window_end", "window_key", "window_start"]

WINDOWS: tuple[str, ...] = ("minute", "hour", "day", "month", "total")


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    if now.tzinfo is UTC:
        return now
    return now.astimezone(UTC)


def window_key(window: str, now: datetime) -> str:
    """The key of the ``window`` period containing ``now``, e.g. ``"month:2026-11"``."""
    t = _utc(now)
    if window == "day":
        return f"day:{t.year:04d}-{t.month:02d}-{t.day:02d}"
    if window == "month":
        return f"month:{t.year:04d}-{t.month:02d}"
    if window == "hour":
        return f"hour:{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}"
    if window == "minute":
        return (
            f"minute:{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}"
        )
    if window == "total":
        return "total"
    raise ValueError(
        f"unknown budget window {window!r}; expected one of {', '.join(WINDOWS)}"
    )


def window_start(window: str, now: datetime) -> datetime | None:
    """First instant (UTC) of the period containing ``now``; None for ``total``."""
    t = _utc(now)
    if window == "minute":
        return t.replace(second=0, microsecond=0)
    if window == "hour":
        return t.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return t.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if window == "total":
        return None
    raise ValueError(
        f"unknown budget window {window!r}; expected one of {', '.join(WINDOWS)}"
    )


def window_end(window: str, now: datetime) -> datetime | None:
    """First instant (UTC) after the period containing ``now``; None for ``total``."""
    start = window_start(window, now)
    if start is None:
        return None
    if window == "minute":
        return start + timedelta(minutes=1)
    if window == "hour":
        return start + timedelta(hours=1)
    if window == "day":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)
