"""Audit storage on SQLite plus a JSON-lines copy. Every function here is blocking.

These few functions are the whole storage seam (connect, append, read, purge, rows for
verify and for the dashboard's request stats); another backend replaces them one for one.
Appends run inside one write transaction that also reads the chain's tail, so several
processes sharing the database still build one unbroken chain, and the JSON-lines copy is
written in the same order while the database write lock is held.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway import audit_chain
from gateway.db import connect as _db_connect

_INSERT = "INSERT INTO audit_records (seq, request_id, ts, tenant, record) VALUES (?,?,?,?,?)"


def connect(db_path: Path | str) -> sqlite3.Connection:
    return _db_connect(db_path)


def _iso(ts: datetime) -> str:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def tail(conn: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) of the newest record; (0, GENESIS) for an empty store."""
    row = conn.execute(
        "SELECT seq, json_extract(record, '$.hash') FROM audit_records ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, audit_chain.GENESIS
    return int(row[0]), row[1] or audit_chain.GENESIS


def append(conn: sqlite3.Connection, jsonl_path: Path, records: Sequence[Any]) -> None:
    """Seal and store records, in order, in one transaction (database row + JSON line each)."""
    if not records:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        seq, prev = tail(conn)
        rows, lines = [], []
        for record in records:
            seq += 1
            line, prev = audit_chain.seal(record, seq, prev)
            rows.append((seq, record.request_id, record.ts, record.tenant, line.decode()))
            lines.append(line)
        conn.executemany(_INSERT, rows)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with jsonl_path.open("ab") as fh:
            fh.write(b"\n".join(lines) + b"\n")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def read(conn: sqlite3.Connection, *, since: datetime | None = None, until: datetime | None = None,
         tenant: str | None = None, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    clauses, params = _filters(since, until, tenant)
    if kind:
        clauses.append("COALESCE(json_extract(record, '$.kind'), 'request') = ?")
        params.append(kind)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(f"SELECT record FROM audit_records {where} ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
    return [orjson.loads(r[0]) for r in rows]


def _filters(since: datetime | None, until: datetime | None, tenant: str | None) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(_iso(since))
    if until is not None:
        clauses.append("ts < ?")
        params.append(_iso(until))
    if tenant:
        clauses.append("tenant = ?")
        params.append(tenant)
    return clauses, params


def request_stats(conn: sqlite3.Connection, since: datetime | None, until: datetime | None,
                  tenant: str | None) -> list[tuple[str, str | None, str | None, int, float, str]]:
    """(ts, tenant, served model, status, latency_ms, outcome) of every request record."""
    clauses, params = _filters(since, until, tenant)
    clauses.append("COALESCE(json_extract(record, '$.kind'), 'request') = 'request'")
    sql = ("SELECT ts, tenant, json_extract(record, '$.model_served'), json_extract(record, '$.status'),"
           " json_extract(record, '$.latency_ms'), json_extract(record, '$.outcome') FROM audit_records"
           f" WHERE {' AND '.join(clauses)} ORDER BY seq")
    return [(r[0], r[1], r[2], int(r[3] or 0), float(r[4] or 0), str(r[5] or "")) for r in conn.execute(sql, params)]


def purge_before(conn: sqlite3.Connection, jsonl_path: Path, cutoff: datetime, now: datetime | None = None) -> int:
    """Remove the oldest records with ts < cutoff (a prefix of the chain) and record the purge."""
    from gateway.audit import (
        AuditRecord,  # the record type; imported here to keep the seam one-way
    )

    conn.execute("BEGIN IMMEDIATE")
    try:
        first_kept = conn.execute("SELECT MIN(seq) FROM audit_records WHERE ts >= ?", (_iso(cutoff),)).fetchone()[0]
        last_seq, _ = tail(conn)
        through = (int(first_kept) - 1) if first_kept is not None else last_seq
        row = conn.execute(
            "SELECT COUNT(*), json_extract(MAX(CASE WHEN seq = ? THEN record END), '$.hash')"
            " FROM audit_records WHERE seq <= ?", (through, through)).fetchone()
        count, anchor = int(row[0]), row[1]
        if count == 0 or anchor is None:
            conn.execute("ROLLBACK")
            return 0
        conn.execute("DELETE FROM audit_records WHERE seq <= ?", (through,))
        stamp = _iso(now or datetime.now(UTC))
        record = AuditRecord(request_id=f"purge_{last_seq + 1}", ts=stamp, api="system", endpoint="retention",
                             kind="purge", action="audit.purged",
                             details={"purged_through_seq": through, "anchor_hash": anchor,
                                      "purged": count, "cutoff": _iso(cutoff)})
        prev = anchor if last_seq == through else tail(conn)[1]
        line, _ = audit_chain.seal(record, last_seq + 1, prev)
        conn.execute(_INSERT, (last_seq + 1, record.request_id, record.ts, None, line.decode()))
        _rewrite_jsonl(jsonl_path, through, line)
        conn.execute("COMMIT")
        return count
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _rewrite_jsonl(path: Path, through: int, purge_line: bytes) -> None:
    kept: list[bytes] = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                seq = orjson.loads(line).get("seq")
            except orjson.JSONDecodeError:
                seq = None
            if not isinstance(seq, int) or seq > through:
                kept.append(line)  # keep anything unrecognised: verify will point at it
    kept.append(purge_line)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(b"\n".join(kept) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def database_rows(conn: sqlite3.Connection) -> Iterator[tuple[int | None, str]]:
    for seq, record in conn.execute("SELECT seq, record FROM audit_records ORDER BY seq"):
        yield int(seq), record


def jsonl_rows(path: Path) -> Iterator[tuple[int | None, bytes]]:
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield None, line.rstrip(b"\n")


def verify_all(db_path: Path, jsonl_path: Path) -> list[audit_chain.VerifyResult]:
    """Verify the database and the JSON-lines copy, then compare their heads."""
    conn = connect(db_path)
    try:
        results = [audit_chain.verify(database_rows(conn), "database")]
    finally:
        conn.close()
    if jsonl_path.exists():
        results.append(audit_chain.verify(jsonl_rows(jsonl_path), f"jsonl {jsonl_path}"))
        db, js = results
        if db.ok and js.ok and (db.head_seq, db.head_hash) != (js.head_seq, js.head_hash):
            behind = db if (db.head_seq or 0) < (js.head_seq or 0) else js
            ahead = js if behind is db else db
            results.append(audit_chain.VerifyResult(
                behind.source, behind.checked, False, (behind.head_seq or 0) + 1, None,
                f"newest records are missing here: it ends at seq {behind.head_seq}, "
                f"the {ahead.source.split()[0]} copy at seq {ahead.head_seq} (records removed)"))
    return results


def last_action(conn: sqlite3.Connection, action: str) -> dict[str, Any] | None:
    """The newest admin record with this `action`, if any."""
    row = conn.execute(
        "SELECT record FROM audit_records WHERE json_extract(record, '$.kind') = 'admin'"
        " AND json_extract(record, '$.action') = ? ORDER BY seq DESC LIMIT 1", (action,)).fetchone()
    return orjson.loads(row[0]) if row else None
