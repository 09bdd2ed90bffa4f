"""SqliteLedger specifics: persistence, background flushing, recovery, hot-path cost."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from budgets import BudgetLimit, LedgerEntry, SqliteLedger, _store
from tests.budgets.factories import NOW, entry

D = Decimal
LIMITS = [BudgetLimit("day", max_tokens=10**6), BudgetLimit("month", max_usd=D("100"))]


async def eventually(check: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, (
            "condition not reached in time"
        )
        await asyncio.sleep(0.005)


def rows_in(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM ledger_entries").fetchone()[0])


async def test_spend_survives_a_restart_to_the_cent(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ledger.db"  # parent directory is created
    rows = [
        entry(
            f"r{i}",
            tenant="t" if i % 3 else "u",
            ts=NOW - timedelta(days=i % 4),
            input_tokens=i,
            output_tokens=2 * i,
            cost_usd=D("0.012345678") * i,
        )
        for i in range(1, 301)
    ]
    first = SqliteLedger(str(db), batch_size=64)
    await first.start()
    res = await first.reserve("t", LIMITS, 10, D("0.01"), NOW)
    await first.settle(res, [r for r in rows if r.tenant == "t"])
    await first.record([r for r in rows if r.tenant == "u"])
    before = await first.balance("t", LIMITS, NOW)
    await first.close()
    assert rows_in(db) == 300

    second = SqliteLedger(str(db))
    await second.start()
    after = await second.balance("t", LIMITS, NOW)
    assert [(b.spent_tokens, b.spent_usd) for b in after] == [
        (b.spent_tokens, b.spent_usd) for b in before
    ]
    today = [r for r in rows if r.tenant == "t" and r.ts == NOW]
    assert after[0].spent_tokens == sum(r.input_tokens + r.output_tokens for r in today)
    [total] = await second.spend(None, None, None, [])
    exact = sum((r.cost_usd for r in rows), D(0))
    assert (
        total.cost_usd == exact
    )  # rows here are whole nano-dollars, so the sum is exact
    assert total.requests == 300
    by_tenant = await second.spend(None, None, None, ["tenant"])
    assert sum((r.cost_usd for r in by_tenant), D(0)).quantize(
        D("0.01")
    ) == exact.quantize(D("0.01"))
    await second.close()


async def test_sub_nano_costs_reload_within_a_nano_dollar_per_row(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "ledger.db")
    rows = [entry(f"r{i}", cost_usd=D("0.0123456789") * i) for i in range(1, 101)]
    first = SqliteLedger(db)
    await first.start()
    await first.balance("search-team", LIMITS, NOW)
    await first.record(rows)
    [_, live] = await first.balance("search-team", LIMITS, NOW)
    await first.close()
    second = SqliteLedger(db)
    await second.start()
    [_, reloaded] = await second.balance("search-team", LIMITS, NOW)
    [total] = await second.spend(None, None, None, [])
    await second.close()
    assert live.spent_usd == sum((r.cost_usd for r in rows), D(0))  # memory is exact
    assert abs(reloaded.spent_usd - live.spent_usd) <= D("1e-9") * len(rows)
    assert total.cost_usd == reloaded.spent_usd
    assert total.cost_usd.quantize(D("0.01")) == live.spent_usd.quantize(D("0.01"))


async def test_schema_and_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(str(db))
    await ledger.start()
    await ledger.record([entry("r1", cost_usd="0.1234567891")])
    await ledger.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        pk = [r[1] for r in conn.execute("PRAGMA table_info(ledger_entries)") if r[5]]
        assert pk == ["request_id", "attempt"]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(ledger_entries)")}
        assert "ledger_entries_tenant_ts" in indexes
        text, nano, ts = conn.execute(
            "SELECT cost_usd, cost_nano_usd, ts FROM ledger_entries"
        ).fetchone()
    assert (text, nano, ts) == (
        "0.1234567891",
        123456789,
        "2026-11-25T13:05:09.000000Z",
    )


async def test_background_flush_writes_without_being_asked(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(str(db), flush_interval_s=0.01)
    await ledger.start()
    await ledger.record([entry("r1"), entry("r2")])
    await eventually(lambda: rows_in(db) == 2)
    await ledger.close()


async def test_failed_flush_keeps_rows_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "ledger.db"
    real_insert = _store.insert_rows
    calls: list[int] = []

    def flaky_insert(
        conn: sqlite3.Connection, rows: Sequence[LedgerEntry]
    ) -> list[LedgerEntry]:
        calls.append(len(rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_insert(conn, rows)

    monkeypatch.setattr(_store, "insert_rows", flaky_insert)
    caplog.set_level(logging.INFO, logger="budgets")
    ledger = SqliteLedger(str(db), flush_interval_s=0.01)
    await ledger.start()
    await ledger.record([entry("req-secretless", model="very-private-model")])
    await eventually(lambda: len(calls) >= 2)
    await ledger.close()
    assert rows_in(db) == 1
    [failure] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "disk I/O error" in failure.getMessage()
    assert "req-secretless" in failure.getMessage()
    assert "very-private-model" not in failure.getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_explicit_flush_raises_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(str(db), flush_interval_s=60)
    await ledger.start()
    await ledger.record([entry("r1"), entry("r2")])

    def broken(
        conn: sqlite3.Connection, rows: Sequence[LedgerEntry]
    ) -> list[LedgerEntry]:
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(_store, "insert_rows", broken)
        with pytest.raises(sqlite3.OperationalError):
            await ledger.flush()
    [bal] = await ledger.balance("search-team", [BudgetLimit("day")], NOW)
    assert bal.spent_tokens == 300  # still counted exactly once
    await ledger.flush()
    assert rows_in(db) == 2
    await ledger.close()


async def test_flush_waits_for_another_writer(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(str(db), flush_interval_s=0.01)
    await ledger.start()
    with sqlite3.connect(db) as blocker:
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
        await ledger.record([entry("r1")])
        await asyncio.sleep(0.05)
        blocker.execute("ROLLBACK")
    await ledger.close()
    assert rows_in(db) == 1


async def test_window_load_counts_rows_still_queued(tmp_path: Path) -> None:
    ledger = SqliteLedger(str(tmp_path / "ledger.db"), flush_interval_s=60)
    await ledger.start()
    await ledger.record([entry("r1", cost_usd="0.5")])
    await ledger.flush()
    await ledger.record([entry("r2", cost_usd="0.25")])  # queued, window not loaded yet
    [bal] = await ledger.balance("search-team", [BudgetLimit("day")], NOW)
    assert (bal.spent_tokens, bal.spent_usd) == (300, D("0.75"))
    await ledger.flush()
    [bal] = await ledger.balance("search-team", [BudgetLimit("day")], NOW)
    assert (bal.spent_tokens, bal.spent_usd) == (300, D("0.75"))
    await ledger.close()


async def test_replay_older_than_memory_is_taken_back_on_flush(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    ledger = SqliteLedger(db, flush_interval_s=60)
    ledger.DEDUPE_CAPACITY = 1
    await ledger.start()
    await ledger.balance("search-team", LIMITS, NOW)
    await ledger.record([entry("r1")])
    await ledger.flush()
    await ledger.record([entry("r2"), entry("r1")])  # r1 has left the dedupe memory
    await ledger.flush()
    day, month = await ledger.balance("search-team", LIMITS, NOW)
    assert (day.spent_tokens, month.spent_usd) == (300, D("0.0002"))
    await ledger.close()

    reopened = SqliteLedger(db, flush_interval_s=60)
    await reopened.start()
    res = await reopened.reserve("search-team", LIMITS, 10, D("0"), NOW)
    await reopened.settle(res, [entry("r2")])  # replayed after a restart
    await reopened.flush()
    day, _ = await reopened.balance("search-team", LIMITS, NOW)
    assert (day.spent_tokens, day.reserved_tokens) == (300, 0)
    await reopened.close()
    assert rows_in(Path(db)) == 2


async def test_hot_path_reads_each_window_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real_totals = _store.window_totals

    def counting(
        conn: sqlite3.Connection, tenant: str, *window: Any
    ) -> tuple[int, int]:
        reads.append(tenant)
        return real_totals(conn, tenant, *window)

    monkeypatch.setattr(_store, "window_totals", counting)
    ledger = SqliteLedger(str(tmp_path / "ledger.db"))
    await ledger.start()

    async def one(i: int) -> None:
        await ledger.balance("t", LIMITS, NOW)
        res = await ledger.reserve("t", LIMITS, 10, D("0.001"), NOW)
        await ledger.settle(res, [entry(f"r{i}", tenant="t")])

    await asyncio.gather(*(one(i) for i in range(300)))
    assert reads == ["t", "t"]  # day and month, each read once
    day, month = await ledger.balance("t", LIMITS, NOW)
    assert (day.spent_tokens, month.spent_usd, day.reserved_tokens) == (
        45_000,
        D("0.03"),
        0,
    )
    await ledger.close()


async def test_forgotten_windows_are_rebuilt_exactly(tmp_path: Path) -> None:
    ledger = SqliteLedger(str(tmp_path / "ledger.db"), flush_interval_s=60)
    await ledger.start()
    await ledger.reserve("t", LIMITS, 10, D("1"), NOW)
    await ledger.record([entry("r1", tenant="t")])
    await ledger.flush()
    await ledger.record([entry("r2", tenant="t")])
    before = await ledger.balance("t", LIMITS, NOW)
    assert ledger._book.prune(NOW + timedelta(days=60), timedelta(0)) == 2
    assert await ledger.balance("t", LIMITS, NOW) == before
    await ledger.close()


async def test_close_flushes_and_then_refuses_usage(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(str(db), flush_interval_s=60)
    await ledger.start()
    res = await ledger.reserve("t", LIMITS, 10, D("0"), NOW)
    await ledger.settle(res, [entry("r1", tenant="t")])
    await ledger.close()
    await ledger.close()
    assert rows_in(db) == 1
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.record([entry("r2")])


def test_constructor_validates_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SqliteLedger(str(tmp_path / "x.db"), flush_interval_s=0)
    with pytest.raises(ValueError):
        SqliteLedger(str(tmp_path / "x.db"), batch_size=0)


async def test_closed_ledger_opens_no_new_windows(tmp_path: Path) -> None:
    ledger = SqliteLedger(str(tmp_path / "ledger.db"))
    await ledger.start()
    await ledger.close()
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.balance("t", LIMITS, NOW)
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.spend(None, None, None, [])
