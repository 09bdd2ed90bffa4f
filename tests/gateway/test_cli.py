"""The `gateway` command: check, keys, spend, audit, explain, policy test, and serve's drain."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.cli import main
from tests.gateway.test_e2e_openai import ledger_rows, wait_for
from tests.harness import (
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
    free_port,
    write_config,
)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_ok(tmp_path: Path, gw_config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, gw_config)
    code, out, _ = run_cli(capsys, "check", "--config", str(path))
    assert code == 0 and "4 models" in out


def test_check_reports_file_and_line(tmp_path: Path, gw_config: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    gw_config["models"][0]["provider"] = "missing-provider"
    gw_config["tenants"][0]["policy"] = "missing-policy"
    gw_config["providers"][0]["colour"] = "blue"
    path = write_config(tmp_path, gw_config)
    code, _, err = run_cli(capsys, "check", "--config", str(path))
    assert code == 1
    lines = path.read_text().splitlines()
    colour_line = next(i for i, line in enumerate(lines, 1) if "colour" in line)
    assert f"{path}:{colour_line}: providers.0: unknown key 'colour'" in err
    # Cross-references are checked once the types are valid.
    del gw_config["providers"][0]["colour"]
    path = write_config(tmp_path, gw_config)
    code, _, err = run_cli(capsys, "check", "--config", str(path))
    lines = path.read_text().splitlines()
    provider_line = next(i for i, line in enumerate(lines, 1) if "missing-provider" in line)
    assert code == 1 and f"{path}:{provider_line}: model 'mock-a' names unknown provider" in err
    assert "unknown policy 'missing-policy'" in err


def test_check_reports_bad_policy(tmp_path: Path, gw_config: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    policy = {"name": "default", "routes": [{"name": "r", "when": {"model": "*"}, "candidates": ["ghost"]}]}
    path = write_config(tmp_path, gw_config, [policy])
    code, _, err = run_cli(capsys, "check", "--config", str(path))
    assert code == 1 and "default.yaml:" in err and "ghost" in err


def test_keys_lifecycle(start_gateway: Callable[..., RunningGateway], capsys: pytest.CaptureFixture[str]) -> None:
    gw = start_gateway()
    cfg = str(gw.config_path)
    code, out, _ = run_cli(capsys, "keys", "create", "--config", cfg, "--tenant", "team", "--name", "ci")
    key = out.strip()
    assert code == 0 and key.startswith("gw-")
    c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    code, out, _ = run_cli(capsys, "keys", "list", "--config", cfg, "--tenant", "team")
    assert code == 0 and "ci" in out and key not in out
    from gateway.keys import hash_key

    assert hash_key(key) not in out
    key_id = next(line.split()[0] for line in out.splitlines() if line.startswith("key_"))
    code, _, _ = run_cli(capsys, "keys", "revoke", "--config", cfg, key_id)
    assert code == 0

    def refused() -> bool:
        try:
            c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            return True
        return False

    wait_for(refused, timeout=5)
    assert run_cli(capsys, "keys", "revoke", "--config", cfg, key_id)[0] == 1


def test_admin_keys_api(gateway: RunningGateway) -> None:
    admin = {"authorization": "Bearer admin-test-key"}
    assert httpx.post(f"{gateway.url}/admin/keys", json={"tenant": "team"},
                      headers={"authorization": f"Bearer {TENANT_KEY}"}).status_code == 401
    created = httpx.post(f"{gateway.url}/admin/keys", json={"tenant": "team", "name": "api"}, headers=admin)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    ok = httpx.get(f"{gateway.v1}/models", headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    assert httpx.delete(f"{gateway.url}/admin/keys/{key_id}", headers=admin).status_code == 200
    assert httpx.get(f"{gateway.v1}/models", headers={"authorization": f"Bearer {key}"}).status_code == 401


def test_spend_and_audit_reports(gateway: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    c = openai.OpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    for model in ("mock-a", "mock-a", "mock-b"):
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi there"}])
    rows = wait_for(lambda: len(ledger_rows(gateway)) == 3 and ledger_rows(gateway))
    cfg = str(gateway.config_path)
    code, out, _ = run_cli(capsys, "spend", "--config", cfg, "--by", "tenant,model", "--format", "csv")
    assert code == 0
    report = list(csv.DictReader(io.StringIO(out)))
    by_model = {r["model"]: r for r in report}
    assert by_model["mock-a"]["requests"] == "2" and by_model["mock-b"]["requests"] == "1"
    from decimal import Decimal

    assert sum(Decimal(r["cost_usd"]) for r in report) == sum(Decimal(r[4]) for r in rows)
    code, out, _ = run_cli(capsys, "spend", "--config", cfg, "--format", "json")
    assert code == 0 and json.loads(out)[0]["tenant"] == "team"
    admin = httpx.get(f"{gateway.url}/admin/spend?by=model", headers={"authorization": "Bearer admin-test-key"})
    assert {r["model"] for r in admin.json()["data"]} == {"mock-a", "mock-b"}
    code, out, _ = run_cli(capsys, "audit", "--config", cfg, "--tenant", "team")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 3 and {r["model_served"] for r in records} == {"mock-a", "mock-b"}
    code, out, _ = run_cli(capsys, "audit", "--config", cfg, "--format", "table")
    assert code == 0 and "mock-b" in out


def test_explain_and_policy_test(tmp_path: Path, gw_config: dict[str, Any],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    policy = {
        "name": "default",
        "routes": [
            {"name": "cheap", "when": {"model": "cheap"}, "candidates": ["mock-b", "mock-a"], "objective": "cheapest"},
            {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]},
        ],
        "tests": [{"tenant": "team", "model": "cheap", "expect": "mock-a"},
                  {"tenant": "team", "model": "cheap", "expect": "mock-b"}],
    }
    path = write_config(tmp_path, gw_config, [policy])
    code, out, _ = run_cli(capsys, "explain", "--config", str(path), "--tenant", "team", "--model", "cheap", "--json")
    result = json.loads(out)
    assert code == 0 and result["chosen"] == "mock-a" and result["fallbacks"] == ["mock-b"]
    assert result["route"].endswith(":cheap")
    code, out, _ = run_cli(capsys, "explain", "--config", str(path), "--tenant", "narrow", "--model", "cheap")
    assert "mock-b: not in tenant allow-list" in out
    code, out, _ = run_cli(capsys, "policy", "test", "--config", str(path))
    assert code == 1 and "PASS" in out and "FAIL" in out and "1 passed, 1 failed" in out


def test_serve_drains_on_sigterm(tmp_path: Path, gw_config: dict[str, Any], upstream: UpstreamProcess) -> None:
    """SIGTERM mid-request: the request still completes, its usage is settled, exit code 0."""
    path = write_config(tmp_path, gw_config)
    port = free_port()
    env = {**os.environ, "TEST_UPSTREAM_KEY": "sk-upstream-secret-test", "GATEWAY_FLUSH_INTERVAL_S": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), timeout=20)
        upstream.script({"delay_ms": 1500})
        result: dict[str, Any] = {}

        def call() -> None:
            result["resp"] = httpx.post(f"{base}/v1/chat/completions", timeout=20,
                                        headers={"authorization": f"Bearer {TENANT_KEY}"},
                                        json={"model": "mock-a", "messages": [{"role": "user", "content": "hi"}]})

        thread = threading.Thread(target=call)
        thread.start()
        wait_for(lambda: upstream.attempts(), timeout=5)
        proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert result["resp"].status_code == 200
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The ledger flush interval was 5 s: the row exists only because shutdown flushed it.
    import sqlite3

    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 1
    conn.close()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_quickstart_config_checks(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    code, out, _ = run_cli(capsys, "check", "--config", str(root / "deploy" / "quickstart.yaml"))
    assert code == 0
    assert yaml.safe_load((root / "deploy" / "quickstart.yaml").read_text())["state"]["database_url"].startswith(
        "sqlite:///.gateway/")
    code, out, _ = run_cli(capsys, "policy", "test", "--config", str(root / "deploy" / "quickstart.yaml"))
    assert code == 0, out


@pytest.mark.parametrize(("state", "rate_limits", "warned"), [
    ({"database_url": "postgresql://gw@127.0.0.1:5432/gw"}, {"requests_per_minute": 60}, True),
    ({"database_url": "postgres://gw@127.0.0.1:5432/gw"}, {"tokens_per_minute": 1000}, True),
    ({"database_url": "postgresql://gw@127.0.0.1:5432/gw", "redis_url": "redis://127.0.0.1:6379/0"},
     {"requests_per_minute": 60}, False),
    ({"database_url": "postgresql://gw@127.0.0.1:5432/gw"}, {}, False),
    (None, {"requests_per_minute": 60}, False),  # SQLite: one node, in-memory limits as documented
])
def test_check_warns_that_limits_are_per_process_on_postgres_without_redis(
        tmp_path: Path, gw_config: dict[str, Any], capsys: pytest.CaptureFixture[str],
        state: dict[str, Any] | None, rate_limits: dict[str, int], warned: bool) -> None:
    if state is not None:
        gw_config["state"] = state
    gw_config["tenants"][0]["rate_limits"] = rate_limits
    path = write_config(tmp_path, gw_config)
    code, out, _ = run_cli(capsys, "check", "--config", str(path))
    assert code == 0  # a warning, not an error
    warnings = [line for line in out.splitlines() if "rate limits" in line]
    if warned:
        assert warnings == [("warning: state.redis_url is not set: rate limits of tenant 'team' are counted per "
                             "gateway process, so N replicas on this PostgreSQL admit up to N x the limit; set "
                             "state.redis_url to share them")]
    else:
        assert warnings == []
