"""The audit chain with several replicas: each replica's JSON-lines copy is its own segment of
the chain; the database holds every segment, its `seq`s assigned once under the write lock.
`gateway audit verify` checks every segment in the database and each copy against it."""
from __future__ import annotations

import asyncio
import itertools
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from gateway import audit_chain, audit_store
from gateway.audit import AuditRecord, admin_record, append_now, read_audit
from tests.gateway.test_e2e_openai import wait_for
from tests.gatewayprocs import GatewayProcess, replica_config
from tests.harness import ROOT, TENANT_KEY, UpstreamProcess, write_config
from tests.services import REDIS_URL, pg_schema, redis_prefix


def _record(i: int, ts: datetime | None = None) -> AuditRecord:
    return AuditRecord(request_id=f"req_{i:04d}", ts=(ts or datetime.now(UTC)).isoformat(), tenant="team")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _interleaved(db: Path, copies: list[Path], n: int, ts: datetime | None = None) -> None:
    """`n` one-record writes, alternating between the copies (as replicas taking turns)."""
    for i, path in zip(range(n), itertools.cycle(copies), strict=False):
        append_now(db, path, [_record(i, ts)])


def _problems(results: list[audit_chain.VerifyResult]) -> list[str]:
    return [r.describe() for r in results if not r.ok]


def test_each_copy_is_its_own_segment_and_everything_verifies(tmp_path: Path) -> None:
    db, a, b = tmp_path / "state.db", tmp_path / "a" / "audit.jsonl", tmp_path / "b" / "audit.jsonl"
    _interleaved(db, [a, b, b, a, a], 10)
    stored = read_audit(db, kind=None)
    assert [r["seq"] for r in stored] == list(range(1, 11))  # one run of positions across replicas
    lines_a, lines_b = _lines(a), _lines(b)
    assert len({r["segment"] for r in lines_a}) == 1 and len({r["segment"] for r in lines_b}) == 1
    assert lines_a[0]["segment"] != lines_b[0]["segment"]
    for copy in (lines_a, lines_b):  # each copy is a chain of its own
        assert copy[0]["prev_hash"] == audit_chain.GENESIS
        for prev, rec in itertools.pairwise(copy):
            assert rec["prev_hash"] == prev["hash"] and rec["seq"] > prev["seq"]
    assert len(lines_a) + len(lines_b) == 10
    results = audit_store.verify_all(db, [a, b])
    assert _problems(results) == [] and len(results) == 3
    assert "2 segment(s)" in results[0].describe()


@pytest.mark.parametrize("tamper", ["drop_newest_line_of_a", "drop_db_newest_of_b", "edit_b_row", "delete_middle"])
def test_tampering_with_one_segment_is_named(tmp_path: Path, tamper: str) -> None:
    db, a, b = tmp_path / "state.db", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _interleaved(db, [a, b], 8)  # a: 1,3,5,7  b: 2,4,6,8
    conn = sqlite3.connect(db, isolation_level=None)
    expected_source, broken = "jsonl", 0
    if tamper == "drop_newest_line_of_a":
        a.write_bytes(b"".join(line + b"\n" for line in a.read_bytes().splitlines()[:-1]))
        expected_source, broken = f"jsonl {a}", 7
    elif tamper == "drop_db_newest_of_b":  # the database loses b's newest record: b's copy still has it
        conn.execute("DELETE FROM audit_records WHERE seq = 8")
        expected_source, broken = "database", 8
    elif tamper == "edit_b_row":
        conn.execute("UPDATE audit_records SET record = json_set(record, '$.tenant', 'other') WHERE seq = 6")
        expected_source, broken = "database", 6
    elif tamper == "delete_middle":
        conn.execute("DELETE FROM audit_records WHERE seq = 3")
        expected_source, broken = "database", 4
    conn.close()
    failed = [r for r in audit_store.verify_all(db, [a, b]) if not r.ok]
    assert failed, "tampering went unnoticed"
    assert failed[0].source == expected_source and failed[0].broken_seq == broken, failed[0].describe()
    assert failed[0].request_id == f"req_{broken - 1:04d}"  # the record named is the one at that seq


def test_purge_by_one_replica_keeps_every_copy_verifiable(tmp_path: Path) -> None:
    db, a, b = tmp_path / "state.db", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    old = datetime.now(UTC) - timedelta(days=40)
    _interleaved(db, [a, b], 6, ts=old)  # a: 1, 3, 5  b: 2, 4, 6
    _interleaved(db, [b, a], 4)  # b: 7, 9  a: 8, 10
    conn = audit_store.connect(db)
    try:
        assert audit_store.purge_before(conn, a, datetime.now(UTC) - timedelta(days=30)) == 6
        purge = read_audit(db, kind="purge")[0]
        assert purge["segment"] == _lines(a)[0]["segment"] and purge["details"]["purged_through_seq"] == 6
        assert set(purge["details"]["anchors"]) == {_lines(a)[0]["segment"], _lines(b)[0]["segment"]}
        assert [r["seq"] for r in _lines(a)] == [8, 10, 11]  # the purging replica's copy lost the same prefix
        assert min(r["seq"] for r in _lines(b)) == 2  # the other's still holds it ...
        assert _problems(audit_store.verify_all(db, [a, b])) == []
        # ... until its own scheduled run, which finds nothing left to purge in the database.
        assert audit_store.purge_before(conn, b, datetime.now(UTC) - timedelta(days=30)) == 0
    finally:
        conn.close()
    assert [r["seq"] for r in _lines(b)] == [7, 9]
    assert _problems(audit_store.verify_all(db, [a, b])) == []
    append_now(db, b, [admin_record("key.created", tenant="team")])  # chains on after the purge
    assert _problems(audit_store.verify_all(db, [a, b])) == []


def test_a_failed_commit_leaves_no_line_in_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, a = tmp_path / "state.db", tmp_path / "a.jsonl"
    append_now(db, a, [_record(0)])
    before = a.read_bytes()

    class FailingCommit:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    conn = audit_store.connect(db)
    try:
        with pytest.raises(sqlite3.OperationalError):
            audit_store.append(FailingCommit(conn), a, [_record(1)])  # type: ignore[arg-type]
    finally:
        conn.close()
    assert a.read_bytes() == before
    append_now(db, a, [_record(2)])
    assert _problems(audit_store.verify_all(db, a)) == []


def test_records_from_before_segments_still_verify_and_new_ones_start_a_segment(tmp_path: Path) -> None:
    db, a = tmp_path / "state.db", tmp_path / "audit.jsonl"
    conn = audit_store.connect(db)
    prev, lines = audit_chain.GENESIS, []
    for seq in (1, 2, 3):  # written by an older gateway: one chain, no segment field
        record = _record(seq)
        data = orjson.loads(record.to_json())
        del data["segment"]
        data.update(seq=seq, prev_hash=prev)
        data["hash"] = prev = audit_chain.record_hash(data)
        line = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
        conn.execute("INSERT INTO audit_records (seq, request_id, ts, tenant, record) VALUES (?,?,?,?,?)",
                     (seq, record.request_id, record.ts, record.tenant, line.decode()))
        lines.append(line)
    conn.close()
    a.write_bytes(b"".join(line + b"\n" for line in lines))
    assert "segment" not in _lines(a)[0]
    append_now(db, a, [_record(4), _record(5)])
    new = _lines(a)[3:]
    assert new[0]["segment"] and new[0]["prev_hash"] == audit_chain.GENESIS and new[1]["prev_hash"] == new[0]["hash"]
    assert _problems(audit_store.verify_all(db, a)) == []
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE audit_records SET record = json_set(record, '$.tenant', 'x') WHERE seq = 2")
    conn.close()
    assert [r.broken_seq for r in audit_store.verify_all(db, a) if not r.ok] == [2]


# ---------------------------------------------------------------- two real replicas on PostgreSQL

@pytest.fixture
def two_replicas(tmp_path: Path, upstream: UpstreamProcess) -> Iterator[tuple[list[GatewayProcess], list[Path], str]]:
    with ExitStack() as stack:
        pg_url = stack.enter_context(pg_schema())
        prefix = stack.enter_context(redis_prefix())
        nodes, configs = [], []
        for name in ("a", "b"):  # one host each: its own state directory, one shared database
            home = tmp_path / name
            home.mkdir()
            configs.append(write_config(home, replica_config(upstream.url, home, pg_url, REDIS_URL, prefix)))
        for i, config in enumerate(configs):
            node = GatewayProcess(config, tmp_path / f"gateway-{i}.log")
            stack.callback(node.stop)
            nodes.append(node)
        yield nodes, configs, pg_url


async def _burst(urls: list[str], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": "mock-a", "messages": [{"role": "user", "content": f"hello {i}"}]})
            for i in range(n)))


def _verify_cli(config: Path, *copies: Path) -> subprocess.CompletedProcess[str]:
    extra = [arg for path in copies for arg in ("--jsonl", str(path))]
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_two_replicas_on_postgres_verify_then_a_tampered_row_is_named(
        two_replicas: tuple[list[GatewayProcess], list[Path], str], upstream: UpstreamProcess) -> None:
    nodes, configs, pg_url = two_replicas
    upstream.script(*({"delay_ms": 30} for _ in range(40)))  # the two replicas' writes overlap
    answers = asyncio.run(_burst([n.v1 for n in nodes], 40))
    assert [a.status_code for a in answers] == [200] * 40
    wait_for(lambda: len(read_audit(pg_url, limit=-1)) == 40, timeout=15)  # type: ignore[arg-type]
    for node in nodes:
        assert node.stop() == 0  # drained: every record written
    copies = [config.parent / "audit.jsonl" for config in configs]
    rows = read_audit(pg_url, kind=None, limit=-1)  # type: ignore[arg-type]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))  # no seq taken twice, none skipped
    segments = [{r["segment"] for r in _lines(copy)} for copy in copies]
    assert all(len(s) == 1 for s in segments) and segments[0] != segments[1]
    assert {r["segment"] for r in rows} == segments[0] | segments[1]
    per_copy = [sum(1 for r in _lines(c) if r["kind"] == "request") for c in copies]
    assert sorted(per_copy) == [20, 20]  # each replica's copy holds its own requests only

    for config, other in ((configs[0], copies[1]), (configs[1], copies[0])):
        done = _verify_cli(config, other)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "audit chain ok" in done.stdout and "2 segment(s)" in done.stdout
    alone = _verify_cli(configs[1])  # a replica checks the database and its own copy
    assert alone.returncode == 0, alone.stdout + alone.stderr

    victim = next(r for r in rows if r["kind"] == "request" and r["segment"] in segments[1])
    with psycopg.connect(pg_url, autocommit=True) as conn:  # someone lowers a cost in the database
        conn.execute("UPDATE audit_records SET record = jsonb_set(record::jsonb, '{cost_usd}', '\"0\"')::text"
                     " WHERE seq = %s", (victim["seq"],))
    done = _verify_cli(configs[0], copies[1])
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"first broken record seq {victim['seq']} in database" in done.stderr
    assert f"request_id {victim['request_id']}" in done.stderr and "record altered" in done.stderr
