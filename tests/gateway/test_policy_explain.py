"""`gateway explain` on a config with live-like state (recent audit latency, the ledger's
remaining budget): every excluded candidate with its reason, and `gateway policy test`
with the tenant's own data class and allow-list."""
from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from tests.gateway.test_e2e_openai import audit_rows, client, wait_for
from tests.harness import RunningGateway, UpstreamProcess, write_config

LOCAL = {"provider": "primary", "data_boundary": "local", "max_output_tokens": 4096}
EVERYTHING = {"name": "default", "routes": [
    {"name": "everything", "when": {"model": "everything"},
     "candidates": ["mock-b", "slow-local", "no-tools", "small-ctx", "pricey-local", "mock-a"],
     "require": {"max_p95_latency_ms": 300}},
    {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]}]}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def config(gw_config: dict[str, Any]) -> dict[str, Any]:
    models = gw_config["models"]
    models[0]["context_window"] = 128000  # mock-a: the one that fits everything
    models[0]["max_output_tokens"] = 4096
    models += [
        {"name": "slow-local", "upstream_model": "up-slow", "capabilities": ["chat", "tools"],
         "context_window": 128000, **LOCAL},
        {"name": "no-tools", "upstream_model": "up-nt", "capabilities": ["chat"], "context_window": 128000, **LOCAL},
        {"name": "small-ctx", "upstream_model": "up-sc", "capabilities": ["chat", "tools"], "context_window": 8192,
         **LOCAL},
        {"name": "pricey-local", "upstream_model": "up-pl", "capabilities": ["chat", "tools"],
         "context_window": 128000, "input_usd_per_mtok": 100, "output_usd_per_mtok": 100, **LOCAL},
    ]
    gw_config["tenants"][0]["budgets"] = [{"window": "day", "max_usd": 1}]
    return gw_config


def test_explain_shows_every_exclusion_reason(
        config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gw = start_gateway([EVERYTHING])
    c = client(gw)
    upstream.script(*[{"delay_ms": 450}] * 5)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:  # real traffic: slow-local's p95 is ~450ms
        list(pool.map(lambda _: c.chat.completions.create(
            model="slow-local", messages=[{"role": "user", "content": "hi"}], max_tokens=5), range(5)))
    wait_for(lambda: len([r for r in audit_rows(gw) if r.get("model_served") == "slow-local"]) == 5)
    body = tmp_path / "req.json"
    body.write_text(json.dumps({
        "model": "everything", "max_tokens": 4000,
        "messages": [{"role": "user", "content": "lorem " * 7000}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}))
    args = ["explain", "--config", str(gw.config_path), "--tenant", "team", "--model", "everything",
            "--body", str(body), "--data-class", "restricted"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0, out
    assert "chosen:     mock-a" in out and "outcome:    ok (200)" in out
    assert "data class: restricted (tenant internal; x-gateway-data-class header)" in out
    assert "  - mock-b: data_class=restricted: boundary vendor not allowed" in out
    assert "  - no-tools: lacks capability tools" in out
    assert "  - small-ctx: context 8192 < needed 1" in out  # ~8000 input tokens + 4000 output
    assert "  - pricey-local: over budget (est. $1." in out and "> $1.0000 left)" in out
    slow = next(line for line in out.splitlines() if line.startswith("  - slow-local: "))
    assert re.fullmatch(r"  - slow-local: p95 (\d+)ms > 300ms", slow) and int(slow.split()[3][:-2]) >= 430
    assert "budget:     $1 / - tokens left" in out, out

    code, out, _ = run_cli(capsys, *args, "--json")
    result = json.loads(out)
    assert result["chosen"] == "mock-a" and result["fallbacks"] == []
    reasons = {r["model"]: r["reason"] for r in result["rejected"]}
    assert set(reasons) == {"mock-b", "slow-local", "no-tools", "small-ctx", "pricey-local"}
    needed = int(reasons["small-ctx"].rsplit(" ", 1)[1])
    assert needed == result["estimated_input_tokens"] + 4000
    assert float(result["estimated_cost_usd"]) > 0 and result["remaining_budget_usd"] == "1"
    row = next(r for r in result["candidates"] if r["model"] == "slow-local")
    assert row["latency"]["samples"] == 5 and row["verdict"] == "rejected"


def test_explain_without_state_and_the_exit_code(
        config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, config, [EVERYTHING])  # nothing served yet: no database
    code, out, _ = run_cli(capsys, "explain", "--config", str(path), "--tenant", "team", "--model", "mock-b",
                           "--data-class", "confidential", "--json")
    result = json.loads(out)
    assert code == 1 and result["outcome"] == "model_not_allowed" and result["status"] == 403
    assert result["rejected"] == [{"model": "mock-b", "reason": "data_class=confidential: boundary vendor not allowed"}]
    assert not (tmp_path / "state.db").exists()  # explain never creates state


def test_policy_test_uses_the_tenant_data_class_and_allow_list(
        config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config["tenants"][1]["data_class"] = "confidential"
    policy = {"name": "default", "routes": [
        {"name": "smart", "when": {"model": "smart"}, "candidates": ["mock-b", "mock-a"]},
        {"name": "quick", "when": {"model": "quick"}, "candidates": ["slow-local", "mock-a"], "objective": "fastest"},
        {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]}],
        "tests": [
            {"tenant": "team", "model": "smart", "expect": "mock-b"},
            {"tenant": "narrow", "model": "smart", "expect": "mock-a"},  # confidential tenant: no vendor
            {"tenant": "narrow", "model": "mock-b", "expect": "error:model_not_allowed"},
            {"tenant": "team", "model": "quick", "expect": "mock-a",
             "p95_latency_ms": {"slow-local": 900, "mock-a": 200}},
        ]}
    path = write_config(tmp_path, config, [policy])
    code, out, _ = run_cli(capsys, "policy", "test", "--config", str(path))
    assert code == 0, out
    assert "4 passed, 0 failed" in out
