"""Audit storage on SQLite (or PostgreSQL) plus a JSON-lines copy. Every function here is blocking.

These few functions are the whole storage seam (connect, append, read, purge, rows for
verify and for the dashboard's request stats); another backend replaces them one for one.
Appends run inside one write transaction (on PostgreSQL: one advisory lock for every
replica), which assigns the next `seq`s, so processes sharing the database never fork it.
Each local JSON-lines file is a segment of the chain (gateway/audit_chain.py): its newest
line names the segment and the hash the next record links to, and it is written in the same
order while the database write lock is held, so workers sharing a file share its segment.
"""
from __future__ import annotations

import os
import secrets
import socket
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


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(seq) FROM audit_records").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def new_segment() -> str:
    """A segment id: this host's name (a replica's, in containers) and a random part."""
    return f"{socket.gethostname()[:48] or 'gateway'}-{secrets.token_hex(4)}"


def _last_line(path: Path) -> bytes | None:
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        buf, step = b"", 8192
        while pos > 0:
            size = min(step, pos)
            pos -= size
            fh.seek(pos)
            buf = fh.read(size) + buf
            text = buf.rstrip(b"\n")
            cut = text.rfind(b"\n")
            if cut >= 0:
                return text[cut + 1:]
            step *= 2
        return buf.rstrip(b"\n") or None


def segment_tail(jsonl_path: Path) -> tuple[str, str]:
    """(segment, hash to link to) for the next record written through this file: its newest
    line's, or a new segment when the file is empty, missing or older than segments."""
    line = _last_line(jsonl_path)
    if line:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("segment"), str) and isinstance(data.get("hash"), str):
            return data["segment"], data["hash"]
    return new_segment(), audit_chain.GENESIS


def _write_lines(path: Path, lines: list[bytes]) -> int:
    """Append lines; returns the file's size before, to undo the write if the commit fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        before = fh.tell()
        fh.write(b"\n".join(lines) + b"\n")
    return before


def _undo_lines(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


def append(conn: sqlite3.Connection, jsonl_path: Path, records: Sequence[Any]) -> None:
    """Seal and store records, in order, in one transaction (database row + JSON line each)."""
    if not records:
        return
    conn.execute("BEGIN IMMEDIATE")
    written: int | None = None
    try:
        seq = _last_seq(conn)
        segment, prev = segment_tail(jsonl_path)
        rows, lines = [], []
        for record in records:
            seq += 1
            record.segment = segment
            line, prev = audit_chain.seal(record, seq, prev)
            rows.append((seq, record.request_id, record.ts, record.tenant, line.decode()))
            lines.append(line)
        conn.executemany(_INSERT, rows)
        written = _write_lines(jsonl_path, lines)
        conn.execute("COMMIT")
    except BaseException:
        try:
            if written is not None:  # the database has none of them: neither may the copy
                _undo_lines(jsonl_path, written)
        finally:  # (undone first: the write lock still keeps the file's other writers out)
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
    """Remove the oldest records with ts < cutoff (a prefix of the database) and record the purge.

    The local copy loses the same prefix; when another replica did the purge, this one's copy
    is trimmed to it here (on its own next scheduled run)."""
    from gateway.audit import (
        AuditRecord,  # the record type; imported here to keep the seam one-way
    )

    conn.execute("BEGIN IMMEDIATE")
    try:
        first_kept = conn.execute("SELECT MIN(seq) FROM audit_records WHERE ts >= ?", (_iso(cutoff),)).fetchone()[0]
        last_seq = _last_seq(conn)
        through = (int(first_kept) - 1) if first_kept is not None else last_seq
        row = conn.execute(
            "SELECT COUNT(*), json_extract(MAX(CASE WHEN seq = ? THEN record END), '$.hash')"
            " FROM audit_records WHERE seq <= ?", (through, through)).fetchone()
        count, anchor = int(row[0]), row[1]
        if count == 0 or anchor is None:
            _trim_to_last_purge(conn, jsonl_path)
            conn.execute("ROLLBACK")
            return 0
        anchors = {segment or "": digest for segment, digest in conn.execute(
            "SELECT json_extract(record, '$.segment'), json_extract(record, '$.hash') FROM audit_records"
            " WHERE seq IN (SELECT MAX(seq) FROM audit_records WHERE seq <= ?"
            " GROUP BY json_extract(record, '$.segment'))", (through,))}
        conn.execute("DELETE FROM audit_records WHERE seq <= ?", (through,))
        stamp = _iso(now or datetime.now(UTC))
        record = AuditRecord(request_id=f"purge_{last_seq + 1}", ts=stamp, api="system", endpoint="retention",
                             kind="purge", action="audit.purged",
                             details={"purged_through_seq": through, "anchor_hash": anchor, "anchors": anchors,
                                      "purged": count, "cutoff": _iso(cutoff)})
        record.segment, prev = segment_tail(jsonl_path)
        line, _ = audit_chain.seal(record, last_seq + 1, prev)
        conn.execute(_INSERT, (last_seq + 1, record.request_id, record.ts, None, line.decode()))
        _rewrite_jsonl(jsonl_path, through, line)
        conn.execute("COMMIT")
        return count
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _trim_to_last_purge(conn: sqlite3.Connection, jsonl_path: Path) -> None:
    """Drop from the local copy what another replica's purge removed from the database
    (only as far as a purge record vouches for: the copy is evidence otherwise)."""
    first = _first_line_seq(jsonl_path)
    oldest = conn.execute("SELECT MIN(seq) FROM audit_records").fetchone()[0]
    if first is None or oldest is None or first >= int(oldest):
        return
    row = conn.execute("SELECT record FROM audit_records WHERE json_extract(record, '$.kind') = 'purge'"
                       " ORDER BY seq DESC LIMIT 1").fetchone()
    through = orjson.loads(row[0]).get("details", {}).get("purged_through_seq") if row else None
    if isinstance(through, int) and first <= through:
        _rewrite_jsonl(jsonl_path, through, None)


def _first_line_seq(path: Path) -> int | None:
    try:
        with path.open("rb") as fh:
            line = fh.readline()
    except FileNotFoundError:
        return None
    try:
        seq = orjson.loads(line).get("seq") if line.strip() else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _rewrite_jsonl(path: Path, through: int, purge_line: bytes | None) -> None:
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
    if purge_line is not None:
        kept.append(purge_line)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(b"".join(line + b"\n" for line in kept))
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


def verify_all(db_path: Path | str, jsonl_paths: Path | Sequence[Path]) -> list[audit_chain.VerifyResult]:
    """Verify the database (every segment) and each local JSON-lines copy (its own segments),
    then check that each copy's segments end where the database's do."""
    paths = [jsonl_paths] if isinstance(jsonl_paths, Path) else list(jsonl_paths)
    conn = connect(db_path)
    try:
        db = audit_chain.verify(database_rows(conn), "database")
        results = [db]
        for path in paths:
            if not path.exists():
                continue
            copy = audit_chain.verify(jsonl_rows(path), f"jsonl {path}", known=db.marks)
            results.append(copy)
            if db.ok and copy.ok:
                results.extend(_compare_heads(conn, db, copy, path))
    finally:
        conn.close()
    return results


def _compare_heads(conn: sqlite3.Connection, db: audit_chain.VerifyResult, copy: audit_chain.VerifyResult,
                   path: Path) -> list[audit_chain.VerifyResult]:
    """A segment of the copy must end where the database's does (unless already purged there)."""
    purged = db.marks.newest if db.marks else 0
    out = []
    for segment, (seq, digest) in sorted(copy.segments.items()):
        held = db.segments.get(segment)
        if held == (seq, digest) or (held is None and seq <= purged):
            continue
        named = f"segment {segment}" if segment else "the chain"
        if held is not None and held[0] > seq:  # the copy lags: its newest records were removed
            row = conn.execute("SELECT seq, request_id FROM audit_records WHERE seq > ? AND"
                               " COALESCE(json_extract(record, '$.segment'), '') = ? ORDER BY seq LIMIT 1",
                               (seq, segment)).fetchone() or (held[0], None)
            out.append(audit_chain.VerifyResult(
                copy.source, copy.checked, False, int(row[0]), row[1],
                f"the newest records of {named} are missing here: it ends at seq {seq}, the database "
                f"at seq {held[0]} (records removed)"))
            continue
        if held is not None and held[0] == seq:
            out.append(audit_chain.VerifyResult(
                db.source, db.checked, False, seq, None,
                f"the database and {copy.source} disagree on seq {seq} of {named} (one of them was altered)"))
            continue
        since = held[0] if held is not None else purged
        missing, request_id = next(((s, r) for s, r in _segment_seqs(path, segment) if s > since), (seq, None))
        where = f"ends at seq {held[0]}" if held is not None else "has none of it"
        out.append(audit_chain.VerifyResult(
            db.source, db.checked, False, missing, request_id,
            f"the newest records of {named} are missing here: the database {where}, "
            f"{copy.source} goes on to seq {seq} (records removed)"))
    return out


def _segment_seqs(path: Path, segment: str) -> Iterator[tuple[int, str | None]]:
    for _, line in jsonl_rows(path):
        data = orjson.loads(line)
        if audit_chain.segment_of(data) == segment:
            yield int(data["seq"]), data.get("request_id")


def last_action(conn: sqlite3.Connection, action: str) -> dict[str, Any] | None:
    """The newest admin record with this `action`, if any."""
    row = conn.execute(
        "SELECT record FROM audit_records WHERE json_extract(record, '$.kind') = 'admin'"
        " AND json_extract(record, '$.action') = ? ORDER BY seq DESC LIMIT 1", (action,)).fetchone()
    return orjson.loads(row[0]) if row else None
