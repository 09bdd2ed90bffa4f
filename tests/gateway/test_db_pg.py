"""The gateway's own tables on PostgreSQL through gateway.db.connect (keys, audit chain)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import audit_store
from gateway.audit import admin_record, append_now, read_audit
from gateway.db import connect
from gateway.db_pg import translate
from gateway.keys import KeyAdmin
from tests.services import pg_schema


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


@pytest.mark.parametrize(("sqlite", "postgres"), [
    ("SELECT a FROM t WHERE b = ? AND c LIKE 'x%?'", "SELECT a FROM t WHERE b = %s AND c LIKE 'x%%?'"),
    ("SELECT json_extract(record, '$.kind') FROM t", "SELECT ((record)::jsonb #>> '{kind}') FROM t"),
    ("SELECT json_extract(MAX(CASE WHEN seq = ? THEN record END), '$.a.b') FROM t LIMIT ?",
     "SELECT ((MAX(CASE WHEN seq = %s THEN record END))::jsonb #>> '{a,b}') FROM t LIMIT NULLIF(%s, -1)"),
    ("INSERT OR IGNORE INTO t (a) VALUES (?)", "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"),
])
def test_sqlite_dialect_is_translated(sqlite: str, postgres: str) -> None:
    assert translate(sqlite, True) == postgres


def test_keys_live_in_postgres(pg_url: str) -> None:
    admin = KeyAdmin(pg_url)
    key, record = admin.create("team", "ci", expires_in_days=3)
    assert key.startswith("gw-") and admin.lookup(record.key_sha256) == record
    assert [r.id for r in admin.list("team")] == [record.id]
    assert admin.revoke(record.id) and not admin.revoke(record.id)
    admin.touch({record.id: "2026-11-25T00:00:00+00:00"})
    [listed] = KeyAdmin(pg_url).list()  # another "replica" sees the same rows
    assert listed.revoked_at and listed.last_used_at == "2026-11-25T00:00:00+00:00"


def test_audit_chain_lives_in_postgres(pg_url: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "audit.jsonl"
    for i in range(3):
        append_now(pg_url, jsonl, [admin_record(f"test.action{i}", tenant="team")])  # type: ignore[arg-type]
    records = read_audit(pg_url, kind=None, limit=-1)  # type: ignore[arg-type]
    assert [r["action"] for r in records] == ["test.action0", "test.action1", "test.action2"]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert all(result.ok for result in audit_store.verify_all(pg_url, jsonl))  # type: ignore[arg-type]
    conn = connect(pg_url)
    try:
        assert audit_store.last_action(conn, "test.action1")["seq"] == 2  # type: ignore[index]
    finally:
        conn.close()


def test_migrate_command_creates_then_reports_up_to_date(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from tests.harness import base_config, write_config

    config = base_config("http://127.0.0.1:9", tmp_path)
    config["state"] = {"database_url": pg_url}
    path = str(write_config(tmp_path, config))
    assert main(["migrate", "--config", path, "--status"]) == 0
    assert "pending: budgets 1" in capsys.readouterr().out
    assert main(["migrate", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "applied: budgets 1" in out and "applied: gateway 1" in out
    assert main(["migrate", "--config", path]) == 0
    assert capsys.readouterr().out.strip() == "schema is up to date"
    assert main(["migrate", "--config", path, "--status"]) == 0
    assert capsys.readouterr().out.strip() == "schema is up to date"
