"""The audit writer loses and repeats nothing: a store or spool write that fails (with any
error) keeps its batch queued and the flush loop alive, and a shutdown that cancels the loop
while it holds a batch still writes it. Faults are injected at the storage seam
(gateway.audit_store) and at the spool file (budgets.spool.Spool)."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from budgets.spool import Spool
from gateway import audit_store
from gateway.audit import AuditRecord, AuditWriter, read_audit
from gateway.audit_spool import AuditSpool


def _records(start: int, n: int) -> list[AuditRecord]:
    return [AuditRecord(request_id=f"req_{i:04d}", ts=datetime.now(UTC).isoformat(), tenant="team")
            for i in range(start, start + n)]


def _stored_ids(tmp: Path) -> list[str]:
    return [r["request_id"] for r in read_audit(tmp / "state.db", kind=None, limit=100_000)]


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[AuditWriter]:
    w = AuditWriter(tmp_path / "state.db", tmp_path / "audit.jsonl", flush_interval_s=0.01)
    w.spool = AuditSpool(tmp_path / "spool")
    await w.start()
    try:
        yield w
    finally:
        await w.close()


def _chain_ok(tmp: Path) -> bool:
    return all(r.ok for r in audit_store.verify_all(tmp / "state.db", tmp / "audit.jsonl"))


async def test_store_and_spool_failing_once_then_recovering_writes_every_record_once_in_order(
        writer: AuditWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    real_append, real_spool_append = audit_store.append, Spool._append
    store_calls: list[int] = []
    spool_calls: list[int] = []

    def store_fails_once(conn: Any, jsonl: Path, records: Sequence[Any]) -> None:
        store_calls.append(len(records))
        if len(store_calls) == 1:
            raise RuntimeError("store went away")  # not a sqlite3/OS error: any failure must be survived
        real_append(conn, jsonl, records)

    def spool_fails_once(self: Spool, lines: list[bytes]) -> None:
        spool_calls.append(len(lines))
        if len(spool_calls) == 1:
            raise OSError(28, "No space left on device")
        real_spool_append(self, lines)

    monkeypatch.setattr(audit_store, "append", store_fails_once)
    monkeypatch.setattr(Spool, "_append", spool_fails_once)
    first = _records(0, 5)
    for record in first:
        writer.write(record)
    await _until(lambda: len(store_calls) >= 2 and len(_stored_ids(tmp_path)) == 5)
    # The loop is still alive: later records are written by it too, without close().
    second = _records(5, 3)
    for record in second:
        writer.write(record)
    await _until(lambda: len(_stored_ids(tmp_path)) == 8)
    assert _stored_ids(tmp_path) == [r.request_id for r in first + second]
    assert _chain_ok(tmp_path)
    failures = [r for r in caplog.records if r.getMessage().startswith("audit flush failed")]
    assert len(failures) == 1 and failures[0].__dict__["error"] == "RuntimeError"  # logged once, by type
    assert len(spool_calls) == 1  # the spool write failed; the store recovered before a second try was needed
    assert all(p.read_bytes() == b"" for p in (tmp_path / "spool").glob("*.jsonl"))


async def test_a_failing_store_keeps_records_queued_and_spooled_until_it_recovers(
        writer: AuditWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_append = audit_store.append
    down = threading.Event()
    down.set()
    calls: list[int] = []

    def flaky(conn: Any, jsonl: Path, records: Sequence[Any]) -> None:
        calls.append(len(records))
        if down.is_set():
            raise ValueError("store refuses")
        real_append(conn, jsonl, records)

    monkeypatch.setattr(audit_store, "append", flaky)
    records = _records(0, 4)
    for record in records:
        writer.write(record)
    await _until(lambda: any(p.read_bytes() for p in (tmp_path / "spool").glob("*.jsonl")))
    await asyncio.sleep(0.3)
    assert len(calls) < 15  # backs off instead of retrying every 10 ms
    down.clear()
    await _until(lambda: len(_stored_ids(tmp_path)) == 4, timeout=10)
    assert _stored_ids(tmp_path) == [r.request_id for r in records] and _chain_ok(tmp_path)


async def test_shutdown_while_the_loop_waits_with_a_batch_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush loop takes a batch while another store operation holds the connection; close()
    cancels the loop then: the batch is still written, once."""
    writer = AuditWriter(tmp_path / "state.db", tmp_path / "audit.jsonl", flush_interval_s=0.01)
    await writer.start()
    busy, release = threading.Event(), threading.Event()
    real_last_action = audit_store.last_action

    def slow_last_action(conn: Any, action: str) -> Any:
        busy.set()
        release.wait(5)
        return real_last_action(conn, action)

    monkeypatch.setattr(audit_store, "last_action", slow_last_action)
    lookup = asyncio.create_task(writer.last_action("key.created"))  # holds the store while it reads
    await _until(busy.is_set)
    records = _records(0, 6)
    for record in records:
        writer.write(record)
    await asyncio.sleep(0.1)  # the loop has woken up several times meanwhile
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0.1)
    release.set()
    await closing
    assert await lookup is None
    assert _stored_ids(tmp_path) == [r.request_id for r in records] and _chain_ok(tmp_path)


async def test_shutdown_during_a_write_waits_for_it_and_writes_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = AuditWriter(tmp_path / "state.db", tmp_path / "audit.jsonl", flush_interval_s=0.01)
    await writer.start()
    writing, release = threading.Event(), threading.Event()
    real_append = audit_store.append

    def slow_append(conn: Any, jsonl: Path, records: Sequence[Any]) -> None:
        writing.set()
        release.wait(5)
        real_append(conn, jsonl, records)

    monkeypatch.setattr(audit_store, "append", slow_append)
    first = _records(0, 3)
    for record in first:
        writer.write(record)
    await _until(writing.is_set)
    later = _records(3, 2)
    for record in later:
        writer.write(record)  # queued behind the write in progress
    closing = asyncio.create_task(writer.close())  # cancels the loop mid-write
    await asyncio.sleep(0.1)
    release.set()
    await closing
    assert _stored_ids(tmp_path) == [r.request_id for r in first + later] and _chain_ok(tmp_path)
