"""The audit trail: one metadata record per request, never prompt or completion text.

Records are queued on the hot path and written in batches off the event loop, to a
JSON-lines file and to the `audit_records` table.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.db import connect

log = logging.getLogger("gateway.audit")


@dataclass
class Attempt:
    model: str
    provider: str
    outcome: str  # ok | error | retry
    status: int | None
    latency_ms: float
    error: str | None = None


@dataclass
class AuditRecord:
    request_id: str
    ts: str
    tenant: str | None
    key_id: str | None
    api: str
    endpoint: str
    route: str | None = None
    model_requested: str | None = None
    model_served: str | None = None
    provider: str | None = None
    data_class: str | None = None
    stream: bool = False
    status: int = 0
    outcome: str = "ok"
    error_code: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    estimated_input_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: str = "0"
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    overhead_ms: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively, much faster than asdict


class AuditWriter:
    def __init__(self, db_path: Path, jsonl_path: Path, *, flush_interval_s: float = 0.05) -> None:
        self._db_path = db_path
        self._jsonl_path = jsonl_path
        self._interval = flush_interval_s
        self._pending: list[AuditRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        self._jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await asyncio.to_thread(connect, self._db_path)
        self._task = asyncio.create_task(self._loop(), name="audit-flush")

    def write(self, record: AuditRecord) -> None:
        self._pending.append(record)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write_batch, batch)
        except (sqlite3.Error, OSError) as exc:
            log.error("audit flush failed; will retry", extra={"error": type(exc).__name__, "records": len(batch)})
            self._pending = batch + self._pending

    def _write_batch(self, batch: list[AuditRecord]) -> None:
        lines = [r.to_json() for r in batch]
        assert self._conn is not None
        with self._conn:
            self._conn.executemany(
                "INSERT INTO audit_records (request_id, ts, tenant, record) VALUES (?,?,?,?)",
                [(r.request_id, r.ts, r.tenant, line.decode()) for r, line in zip(batch, lines, strict=True)],
            )
        with self._jsonl_path.open("ab") as fh:
            fh.write(b"\n".join(lines) + b"\n")


def read_audit(db_path: Path, *, since: datetime | None = None, tenant: str | None = None,
               limit: int = 1000) -> list[dict[str, Any]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since.isoformat())
    if tenant:
        clauses.append("tenant = ?")
        params.append(tenant)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    conn = connect(db_path)
    try:
        rows = conn.execute(
            f"SELECT record FROM audit_records {where} ORDER BY seq LIMIT ?", (*params, limit)
        ).fetchall()
    finally:
        conn.close()
    return [orjson.loads(r[0]) for r in rows]
