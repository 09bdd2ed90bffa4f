"""The audit hash chain: verify catches edited, removed and inserted records; retention and
admin actions keep it verifiable; /admin/audit is for the admin key only."""
from __future__ import annotations

import copy
import hashlib
import itertools
import shutil
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from gateway import audit_chain, audit_store
from gateway.audit import AuditRecord, admin_record, append_now, read_audit
from gateway.cli import main
from tests.gateway.test_e2e_openai import wait_for
from tests.harness import (
    ADMIN_KEY,
    TENANT_KEY,
    RunningGateway,
    run_gateway,
    write_config,
)

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _requests(gw: RunningGateway, n: int) -> None:
    c = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    for i in range(n):
        c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": f"hello {i}"}])


def _all_records(db: Path) -> list[dict[str, Any]]:
    return read_audit(db, kind=None, limit=100_000)


def _snapshot(gw: RunningGateway, tmp: Path, gw_config: dict[str, Any], name: str) -> Path:
    """A copy of the gateway's audit store (db + jsonl) with a config pointing at it."""
    target = tmp / name
    target.mkdir()
    src = sqlite3.connect(gw.runtime.db_path)
    dst = sqlite3.connect(target / "state.db")
    src.backup(dst)
    src.close()
    dst.close()
    shutil.copy(gw.runtime.audit.jsonl_path, target / "audit.jsonl")
    cfg = copy.deepcopy(gw_config)
    cfg["state"]["database_url"] = f"sqlite:///{target / 'state.db'}"
    cfg["audit"] = {**cfg.get("audit", {}), "jsonl_path": str(target / "audit.jsonl")}
    return write_config(target, cfg)


def _verify(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", "--config", str(config)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def seeded(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    gw = start_gateway()
    _requests(gw, 5)
    wait_for(lambda: len(read_audit(gw.runtime.db_path)) == 5)
    return gw


def test_chain_verifies_and_links_every_record(seeded: RunningGateway, tmp_path: Path, gw_config: dict[str, Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    records = _all_records(seeded.runtime.db_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[0]["prev_hash"] == audit_chain.GENESIS
    for prev, rec in itertools.pairwise(records):
        assert rec["prev_hash"] == prev["hash"] and audit_chain.record_hash(rec) == rec["hash"]
    config = _snapshot(seeded, tmp_path, gw_config, "intact")
    code, out = _verify(config, capsys)
    assert code == 0 and "database: ok" in out and "jsonl" in out and "audit chain ok" in out
    # Both spellings of the command work: --config before or after `verify`.
    assert main(["audit", "--config", str(config), "verify"]) == 0


@pytest.mark.parametrize("tamper, broken", [
    ("edit", 4), ("delete", 5), ("insert", 5), ("edit_jsonl", 4), ("delete_jsonl", 5), ("insert_jsonl", 4),
    ("truncate_db", 0),
])
def test_verify_names_first_broken_record(seeded: RunningGateway, tmp_path: Path, gw_config: dict[str, Any],
                                          capsys: pytest.CaptureFixture[str], tamper: str, broken: int) -> None:
    config = _snapshot(seeded, tmp_path, gw_config, tamper)
    db, jsonl = config.parent / "state.db", config.parent / "audit.jsonl"
    total = len(_all_records(db))
    conn = sqlite3.connect(db, isolation_level=None)
    lines = jsonl.read_bytes().splitlines()
    if tamper == "edit":  # someone lowers a cost
        conn.execute("UPDATE audit_records SET record = json_set(record, '$.cost_usd', '0') WHERE seq = 4")
    elif tamper == "delete":
        conn.execute("DELETE FROM audit_records WHERE seq = 4")
    elif tamper == "insert":  # a forged record, correctly sealed, slipped in as seq 4; the rest renumbered
        forged = AuditRecord(request_id="req_forged", ts=datetime.now(UTC).isoformat(), tenant="team",
                             segment=orjson.loads(lines[2])["segment"])  # in the segment it pretends to belong to
        prev = conn.execute("SELECT json_extract(record, '$.hash') FROM audit_records WHERE seq = 3").fetchone()[0]
        line, _ = audit_chain.seal(forged, 4, prev)
        rows = conn.execute("SELECT seq, record FROM audit_records WHERE seq >= 4 ORDER BY seq DESC").fetchall()
        for seq, record in rows:
            moved = orjson.loads(record)
            moved["seq"] = seq + 1
            conn.execute("UPDATE audit_records SET seq = ?, record = ? WHERE seq = ?",
                         (seq + 1, orjson.dumps(moved).decode(), seq))
        conn.execute("INSERT INTO audit_records (seq, request_id, ts, tenant, record) VALUES (4, ?, ?, ?, ?)",
                     (forged.request_id, forged.ts, "team", line.decode()))
    elif tamper == "edit_jsonl":
        lines[3] = lines[3].replace(b'"status":200', b'"status":201')
    elif tamper == "delete_jsonl":
        del lines[3]
    elif tamper == "insert_jsonl":
        forged = AuditRecord(request_id="req_forged", ts=datetime.now(UTC).isoformat(), tenant="team",
                             segment=orjson.loads(lines[1])["segment"])
        line, _ = audit_chain.seal(forged, 3, orjson.loads(lines[1])["hash"])
        lines.insert(2, line)  # a valid seq 3 before the real seq 3: the real one no longer links
        broken = 3
    elif tamper == "truncate_db":  # the newest records dropped from the database only
        conn.execute("DELETE FROM audit_records WHERE seq > ?", (total - 2,))
        broken = total - 1
    conn.close()
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    code, out = _verify(config, capsys)
    assert code == 1, out
    assert f"first broken record seq {broken} " in out, out
    expected_source = "jsonl" if tamper.endswith("_jsonl") else "database"
    assert f"in {expected_source}" in out


def test_retention_purge_is_recorded_and_chain_still_verifies(
        seeded: RunningGateway, tmp_path: Path, gw_config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rt = seeded.runtime
    before = _all_records(rt.db_path)
    time.sleep(0.05)
    _requests(seeded, 2)
    wait_for(lambda: len(read_audit(rt.db_path)) == 7)
    newest_old = datetime.fromisoformat(before[-1]["ts"])
    cutoff = newest_old + timedelta(milliseconds=20)
    # The storage purge itself (the scheduled task calls this; BEGIN IMMEDIATE makes it safe
    # beside the running writer).
    conn = audit_store.connect(rt.db_path)
    try:
        count = audit_store.purge_before(conn, rt.audit.jsonl_path, cutoff)
    finally:
        conn.close()
    assert count == len(before)
    after = _all_records(rt.db_path)
    assert after[0]["seq"] == len(before) + 1 and after[-1]["kind"] == "purge"
    purge = after[-1]
    assert purge["details"]["purged_through_seq"] == len(before) and purge["details"]["purged"] == len(before)
    assert purge["details"]["anchor_hash"] == before[-1]["hash"]
    jsonl_seqs = [orjson.loads(line)["seq"] for line in rt.audit.jsonl_path.read_bytes().splitlines()]
    assert jsonl_seqs == [r["seq"] for r in after]  # the JSON-lines copy was purged too
    config = _snapshot(seeded, tmp_path, gw_config, "purged")
    code, out = _verify(config, capsys)
    assert code == 0, out
    # Removing one more old record by hand is not covered by the purge record.
    conn = sqlite3.connect(config.parent / "state.db", isolation_level=None)
    conn.execute("DELETE FROM audit_records WHERE seq = ?", (len(before) + 1,))
    conn.close()
    code, out = _verify(config, capsys)
    assert code == 1 and "no purge record covers it" in out and f"seq {len(before) + 2}" in out


def test_scheduled_purge_runs_at_start(tmp_path: Path, gw_config: dict[str, Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gw_config["audit"] = {"log_bodies": False, "retention_days": 1}
    path = write_config(tmp_path, gw_config)
    db = tmp_path / "state.db"
    old = datetime.now(UTC) - timedelta(days=3)
    append_now(db, tmp_path / "audit.jsonl", [admin_record("key.created", tenant="team", now=old,
                                                          details={"key_id": "key_old"})])
    with run_gateway(path) as gw:
        wait_for(lambda: any(r["kind"] == "purge" for r in _all_records(gw.runtime.db_path)))
    records = _all_records(db)
    assert all(r.get("details", {}).get("key_id") != "key_old" for r in records)
    assert main(["audit", "verify", "--config", str(path)]) == 0


def test_admin_actions_are_audit_records(start_gateway: Callable[..., RunningGateway], tmp_path: Path,
                                         gw_config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    gw = start_gateway()
    startup = wait_for(lambda: {r["action"]: r for r in read_audit(gw.runtime.db_path, kind="admin")})
    policy_file = tmp_path / "policies" / "default.yaml"
    assert startup["policy.loaded"]["details"]["sha256"] == hashlib.sha256(policy_file.read_bytes()).hexdigest()
    created = httpx.post(f"{gw.url}/admin/keys", json={"tenant": "team", "name": "ci"}, headers=ADMIN).json()
    assert httpx.delete(f"{gw.url}/admin/keys/{created['id']}", headers=ADMIN).status_code == 200
    code = main(["keys", "create", "--config", str(gw.config_path), "--tenant", "team", "--name", "cli"])
    key = capsys.readouterr().out.strip()
    assert code == 0
    policy = yaml.safe_load(policy_file.read_text())
    policy["routes"][0]["candidates"] = ["mock-b", "mock-a"]
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    assert httpx.post(f"{gw.url}/admin/reload", headers=ADMIN).status_code == 200

    def actions() -> list[dict[str, Any]]:
        return read_audit(gw.runtime.db_path, kind="admin")

    wait_for(lambda: any(r["action"] == "policy.reloaded" for r in actions()))
    by_action: dict[str, list[dict[str, Any]]] = {}
    for r in actions():
        by_action.setdefault(r["action"], []).append(r)
    assert by_action["key.created"][0]["details"]["key_id"] == created["id"]
    assert by_action["key.created"][0]["tenant"] == "team"
    assert by_action["key.created"][1]["endpoint"] == "cli"
    assert by_action["key.revoked"][0]["details"]["key_id"] == created["id"]
    cli_key_id = by_action["key.created"][1]["details"]["key_id"]
    assert main(["keys", "revoke", "--config", str(gw.config_path), cli_key_id]) == 0
    assert capsys.readouterr().out.strip() == f"revoked {cli_key_id}"
    revoked = [r for r in actions() if r["action"] == "key.revoked"]
    assert [(r["endpoint"], r["details"]["key_id"]) for r in revoked] == [("admin-api", created["id"]),
                                                                         ("cli", cli_key_id)]
    reloaded = by_action["policy.reloaded"][0]["details"]
    assert reloaded["sha256"] == hashlib.sha256(policy_file.read_bytes()).hexdigest()
    assert reloaded["previous_sha256"] == startup["policy.loaded"]["details"]["sha256"]
    text = orjson.dumps(_all_records(gw.runtime.db_path))
    assert created["key"].encode() not in text and key.encode() not in text  # never the key itself


def test_budget_change_across_restart_is_recorded(tmp_path: Path, gw_config: dict[str, Any]) -> None:
    path = write_config(tmp_path, gw_config)
    with run_gateway(path):
        pass
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_usd": 250}]
    path = write_config(tmp_path, gw_config)
    with run_gateway(path) as gw:
        changed = wait_for(lambda: [r for r in read_audit(gw.runtime.db_path, kind="admin")
                                    if r["action"] == "budget.changed"])
    assert changed[0]["tenant"] == "team"
    assert changed[0]["details"]["before"][0]["max_usd"] == "100"
    assert changed[0]["details"]["after"][0]["max_usd"] == "250"
    assert not [r for r in read_audit(tmp_path / "state.db", kind="admin") if r["action"] == "policy.reloaded"]
    assert audit_store.verify_all(tmp_path / "state.db", tmp_path / "audit.jsonl")[0].ok


def test_admin_audit_endpoint(seeded: RunningGateway) -> None:
    url = f"{seeded.url}/admin/audit"
    assert httpx.get(url, headers={"authorization": f"Bearer {TENANT_KEY}"}).status_code == 401
    assert httpx.get(url).status_code == 401
    data = httpx.get(url, params={"kind": "request", "tenant": "team"}, headers=ADMIN).json()["data"]
    assert len(data) == 5 and {r["model_served"] for r in data} == {"mock-a"}
    admin = httpx.get(url, params={"kind": "admin"}, headers=ADMIN).json()["data"]
    assert {r["action"] for r in admin} >= {"policy.loaded", "config.loaded"}
    lines = httpx.get(url, params={"format": "jsonl", "limit": "2"}, headers=ADMIN).text.splitlines()
    assert len(lines) == 2 and orjson.loads(lines[0])["seq"] == 1
    assert httpx.get(url, params={"since": "not-a-date"}, headers=ADMIN).status_code == 400


def test_sealed_form_is_the_canonical_form_verify_recomputes() -> None:
    from gateway.audit import Attempt

    record = AuditRecord(
        request_id="r1", ts="2026-12-03T10:00:00+00:00", tenant="t", key_id="k", route="p@v:r",
        attempts=[Attempt("m-b", "p", "retry", 503, 12.5, "status", 1), Attempt("m-a", "p", "ok", 200, 3.25)],
        features={"z": [1, {"y": 2, "b": None}], "a": "x"}, usage_raw={"prompt_tokens": 3, "details": {"b": 1, "a": 0}},
        details={"k": True},
    )
    stored, digest = audit_chain.seal(record, 7, "f" * 64)
    parsed = orjson.loads(stored)
    assert parsed["attempts"][0] == {"model": "m-b", "provider": "p", "outcome": "retry", "status": 503,
                                     "latency_ms": 12.5, "error": "status", "started_ns": 1}
    assert digest == parsed["hash"] == audit_chain.record_hash(parsed)
    assert stored == orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)  # every level sorted
