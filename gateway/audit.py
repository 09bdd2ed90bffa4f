"""The audit trail: one record per request and per admin action, hash-chained.

Records are queued on the hot path (a list append) and written in batches off the event
loop. Everything costly happens in the flush thread: redacting bodies (only with
`audit.log_bodies: true`), serialising, hashing the chain. Storage lives behind the
small functions of `gateway.audit_store` so another backend can replace it.

A request record holds metadata only: who, which route and policy version, which model
and provider, data class, status, tokens, cost, timings. Prompts and completions are
stored only when `log_bodies` is on, and then only as `gateway.sensitive.redact` leaves
them: every secret or PII value replaced by `[KIND len=N h=xxxxxxxx]`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway import audit_store
from gateway.sensitive import placeholder, redact

log = logging.getLogger("gateway.audit")

RECORD_KINDS = ("request", "admin", "purge")
_MAX_BACKOFF_S = 2.0  # the longest wait between write attempts while the store fails
_SECRET_FIELD_NAMES = ("password", "passwd", "secret", "token", "api_key", "apikey", "authorization")


@dataclass
class Attempt:
    model: str
    provider: str
    outcome: str  # ok | error | retry
    status: int | None
    latency_ms: float
    error: str | None = None
    started_ns: int = 0  # wall clock (time.time_ns) when the attempt began; 0 if unknown


@dataclass
class AuditRecord:
    request_id: str
    ts: str
    tenant: str | None = None
    key_id: str | None = None
    api: str = "openai"
    endpoint: str = ""
    kind: str = "request"  # request | admin | purge
    action: str | None = None  # admin records: key.created, key.revoked, policy.loaded, ...
    route: str | None = None
    policy_version: str | None = None
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
    cache_write_tokens: int = 0  # part of input_tokens written to a provider cache
    usage_raw: dict[str, Any] | None = None  # the provider's usage object as reported (normalised above)
    estimated_input_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: str = "0"
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    overhead_ms: float | None = None
    trace_id: str | None = None
    # request_id is the gateway's own unique id (the ledger rows' key); this is the caller's x-request-id, if any.
    client_request_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # Only with audit.log_bodies; raw until the flush thread redacts them.
    request_body: Any = None
    response_text: str | None = None
    # Set when the record is written (gateway.audit_store): position, segment, chain links.
    seq: int | None = None
    segment: str | None = None  # the local JSON-lines file's segment (one per replica): chained per segment
    prev_hash: str | None = None
    hash: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively, much faster than asdict


def admin_record(action: str, *, tenant: str | None = None, actor: str = "admin-api",
                 details: dict[str, Any] | None = None, now: datetime | None = None) -> AuditRecord:
    """An admin action as an audit record (`kind: admin`)."""
    return AuditRecord(
        request_id="adm_" + secrets.token_hex(8), ts=(now or datetime.now(UTC)).isoformat(), tenant=tenant,
        api="admin", endpoint=actor, kind="admin", action=action, details=dict(details or {}),
    )


def file_sha256(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def redact_body(value: Any, key: str = "") -> Any:
    """A JSON value with every string redacted; values of secret-named fields replaced whole."""
    if isinstance(value, str):
        if key and len(value) >= 8 and any(name in key.lower() for name in _SECRET_FIELD_NAMES):
            return placeholder("GENERIC_SECRET", value)
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_body(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_body(v, key) for v in value]
    return value


def _redacted(record: AuditRecord) -> AuditRecord:
    if record.request_body is not None:
        record.request_body = redact_body(record.request_body)
    if record.response_text is not None:
        record.response_text = redact(record.response_text)
    return record


class AuditWriter:
    """Batches records to the store; purges records past `retention_days` on a schedule."""

    def __init__(self, db_path: Path, jsonl_path: Path, *, flush_interval_s: float = 0.05,
                 log_bodies: bool = False, retention_days: int | None = None,
                 purge_interval_s: float = 3600.0) -> None:
        self._db_path = db_path
        self._jsonl_path = jsonl_path
        self._interval = flush_interval_s
        self.log_bodies = log_bodies
        self.retention_days = retention_days
        self._purge_interval_s = purge_interval_s
        self._pending: list[AuditRecord] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one store operation at a time on the one connection
        self.spool: Any = None  # gateway.audit_spool.AuditSpool (set by the runtime): failed writes, on disk
        self._failures: set[str] = set()  # what has failed since the last good write (logged once each)

    @property
    def jsonl_path(self) -> Path:
        return self._jsonl_path

    async def start(self) -> None:
        self._jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await asyncio.to_thread(audit_store.connect, self._db_path)
        if self.spool is not None:  # replay what a stopped process could not write
            await self.spool.open()
            self._pending[:0] = await self.spool.adopt(self._conn)
        self._tasks = [asyncio.create_task(self._flush_loop(), name="audit-flush")]
        if self.retention_days is not None:
            self._tasks.append(asyncio.create_task(self._purge_loop(), name="audit-retention"))

    def write(self, record: AuditRecord) -> None:
        self._pending.append(record)

    def admin(self, action: str, *, tenant: str | None = None, actor: str = "admin-api",
              details: dict[str, Any] | None = None) -> None:
        self.write(admin_record(action, tenant=tenant, actor=actor, details=details))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        async with self._lock:  # a write or lookup still in its thread (the loop's, shielded) ends first
            pass
        await self.flush()
        if self.spool is not None:
            await self.spool.close()  # a non-empty spool stays on disk for the next process
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _flush_loop(self) -> None:
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - never dies: whatever failed, the records stay queued
                self._failed("flush", exc)
            # A failing store is retried less and less often (the queue keeps its order meanwhile).
            delay = min(max(delay * 2, self._interval), _MAX_BACKOFF_S) if self._failures else self._interval

    async def _purge_loop(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception as exc:  # noqa: BLE001 - never dies: the next run tries again
                log.error("audit retention purge failed; will retry", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._purge_interval_s)

    async def flush(self) -> None:
        if self._pending and self._conn is not None:
            # Shielded: a caller cancelled meanwhile (the loop, at shutdown) never drops a batch taken.
            await asyncio.shield(self._flush_now())

    async def _flush_now(self) -> None:
        async with self._lock:  # the batch is taken under the lock, so batches reach the store in order
            if not self._pending or self._conn is None:
                return
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_batch, batch)
            except Exception as exc:  # noqa: BLE001 - any failure: back to the front of the queue, retried later
                self._pending[:0] = batch
                self._failed("flush", exc)
                await self._to_spool(self.spool.on_failure(self._pending, self._storable) if self.spool else None)
                return
            if self._failures:
                log.info("audit writes recovered", extra={"records": len(batch) + len(self._pending)})
                self._failures.clear()
            await self._to_spool(self.spool.on_written(len(batch)) if self.spool else None)

    async def _to_spool(self, step: Awaitable[None] | None) -> None:
        try:
            if step is not None:
                await step
        except Exception as exc:  # noqa: BLE001 - the records are still queued in memory; the next failure spools them
            self._failed("spool write", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        """Log a failure once per outage and error type (not at every retry)."""
        kind = f"{what}:{type(exc).__name__}"
        if kind not in self._failures:
            self._failures.add(kind)
            log.error(f"audit {what} failed; will retry",
                      extra={"error": type(exc).__name__, "records": len(self._pending)})

    def _storable(self, record: AuditRecord) -> AuditRecord:
        """A copy as it may be stored: bodies redacted, or dropped without log_bodies."""
        copy = dataclasses.replace(record)
        if self.log_bodies:
            return _redacted(copy)
        copy.request_body = copy.response_text = None
        return copy

    def _write_batch(self, batch: list[AuditRecord]) -> None:
        assert self._conn is not None
        records = [_redacted(r) for r in batch] if self.log_bodies else batch
        if not self.log_bodies:
            for r in records:  # never store a body that was attached by mistake
                r.request_body = r.response_text = None
        audit_store.append(self._conn, self._jsonl_path, records)

    async def last_action(self, action: str) -> dict[str, Any] | None:
        if self._conn is None:
            return None
        await self.flush()
        async with self._lock:
            return await asyncio.to_thread(audit_store.last_action, self._conn, action)

    async def purge(self, now: datetime | None = None) -> int:
        """Drop records older than `retention_days`; the purge is itself recorded."""
        if self.retention_days is None or self._conn is None:
            return 0
        await self.flush()
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention_days)
        async with self._lock:
            purged = await asyncio.to_thread(audit_store.purge_before, self._conn, self._jsonl_path, cutoff, now)
        if purged:
            log.info("audit retention purge", extra={"purged": purged, "retention_days": self.retention_days})
        return purged


def append_now(db_path: Path, jsonl_path: Path, records: list[AuditRecord]) -> None:
    """Write records at once (for one-shot commands such as `gateway keys create`)."""
    conn = audit_store.connect(db_path)
    try:
        audit_store.append(conn, jsonl_path, records)
    finally:
        conn.close()


def read_audit(db_path: Path, *, since: datetime | None = None, tenant: str | None = None,
               limit: int = 1000, until: datetime | None = None,
               kind: str | None = "request") -> list[dict[str, Any]]:
    """Stored records, oldest first; request records only unless `kind` says otherwise (None: all)."""
    conn = audit_store.connect(db_path)
    try:
        return audit_store.read(conn, since=since, until=until, tenant=tenant, kind=kind, limit=limit)
    finally:
        conn.close()
