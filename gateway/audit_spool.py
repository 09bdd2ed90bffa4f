"""Audit records the store could not take, kept in a local spool file until it can.

``AuditWriter`` keeps failed batches queued (and retries them every flush); this adds the
durable copy: on a failed write the queued records not spooled yet are appended (already
redacted: bodies never reach the spool raw), and once every spooled record is written the
file is emptied. A process that died with a non-empty spool has it replayed by the next
one using the same directory (``adopt``), skipping records the store already holds (same
request id and timestamp), so nothing is written twice.
"""
from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from budgets import Spool
from gateway.audit import Attempt, AuditRecord

_FIELDS = {f.name for f in dataclasses.fields(AuditRecord)}


def from_json(line: bytes) -> AuditRecord:
    data: dict[str, Any] = {k: v for k, v in orjson.loads(line).items() if k in _FIELDS}
    data["attempts"] = [Attempt(**a) for a in data.get("attempts") or []]
    return AuditRecord(**data)


class AuditSpool:
    def __init__(self, directory: Path) -> None:
        self._spool = Spool(directory, "audit")
        self._spooled = 0  # leading queued records that are already in the spool file

    async def open(self) -> None:
        await self._spool.open()

    async def adopt(self, conn: Any) -> list[AuditRecord]:
        """Records of dead processes' spools that the store does not hold yet."""
        lines = await self._spool.adopt_orphans()
        if not lines:
            return []
        records = [from_json(line) for line in lines]
        held = await asyncio.to_thread(_present, conn, [r.request_id for r in records])
        fresh = [r for r in records if (r.request_id, r.ts) not in held]
        self._spooled = len(fresh)
        if not fresh:
            await self._spool.clear()
        return fresh

    async def on_failure(self, queued: Sequence[AuditRecord], storable: Callable[[AuditRecord], AuditRecord]) -> None:
        """The front of ``queued`` failed to write: make sure all of it is in the spool."""
        fresh = queued[self._spooled:]
        if fresh:
            await self._spool.append([storable(r).to_json() for r in fresh])
            self._spooled = len(queued)

    async def on_written(self, count: int) -> None:
        """``count`` records from the front of the queue reached the store."""
        if self._spooled:
            self._spooled = max(0, self._spooled - count)
            if self._spooled == 0:
                await self._spool.clear()

    async def close(self) -> None:
        await self._spool.close()


def _present(conn: sqlite3.Connection, request_ids: list[str]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for i in range(0, len(request_ids), 500):
        chunk = request_ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(f"SELECT request_id, ts FROM audit_records WHERE request_id IN ({marks})", chunk)
        found.update((str(r[0]), str(r[1])) for r in rows)
    return found
