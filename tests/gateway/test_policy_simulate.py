"""`gateway policy simulate`: replaying recorded audit metadata under a new policy file."""
from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.simulate import load_candidate_policy, simulate
from tests.gateway.test_e2e_openai import audit_rows, client, ledger_rows, wait_for
from tests.harness import RunningGateway, write_config

NEW_POLICY = """\
name: default
routes:
  - name: sensitive
    when: {data_class: [confidential, restricted]}
    candidates: [mock-a]
  - name: cheap
    when: {model: cheap}
    candidates: [mock-b, mock-a]
    objective: cheapest
  - name: direct
    when: {model: "*"}
    candidates: ["$requested"]
"""


def record(i: int, tenant: str, requested: str, served: str | None, candidates: list[str], *,
           latency: float = 0.0, cost: str = "0", outcome: str = "ok", data_class: str = "internal",
           route: str = "default@aaaaaa:cheap", day: int = 21, **features: Any) -> dict[str, Any]:
    return {
        "request_id": f"req_{i}", "ts": f"2026-11-{day}T10:00:{i:02d}+00:00", "tenant": tenant, "key_id": f"key-{tenant}",
        "api": "openai", "endpoint": "chat.completions", "route": route, "model_requested": requested,
        "model_served": served, "data_class": data_class, "status": 200 if outcome == "ok" else 403,
        "outcome": outcome, "input_tokens": 1000 if served else 0, "output_tokens": 500 if served else 0,
        "cached_input_tokens": 0, "cost_usd": cost, "latency_ms": latency,
        "features": {"capabilities": ["chat"], "input_tokens_bound": 1158, "max_output_tokens": 500,
                     "candidates": candidates, "rejected": [], **features},
    }


def fixture_records() -> list[dict[str, Any]]:
    """mock-b costs $0.006 for 1000 in + 500 out, mock-a $0.002."""
    records = [record(i, "team", "cheap", "mock-b", ["mock-b", "mock-a"], latency=ms, cost="0.006")
               for i, ms in enumerate((800, 900, 1000, 1100), start=1)]
    records += [record(i, "team", "mock-a", "mock-a", ["mock-a"], latency=ms, cost="0.002", route="default@aaaaaa:direct")
                for i, ms in ((5, 200), (6, 300))]
    records += [record(i, "narrow", "mock-a", "mock-a", ["mock-a"], latency=ms, cost="0.002", route="default@aaaaaa:direct")
                for i, ms in ((7, 100), (8, 400), (9, 500))]
    # Refused under the old policy (confidential to a vendor model): admitted by the new one.
    records.append(record(10, "team", "mock-b", None, [], outcome="error", data_class="confidential",
                          route="default@aaaaaa:direct"))
    # Never replayed: a shadow copy, another policy's traffic, a request that never reached routing.
    records.append(record(11, "team", "cheap", "mock-b", ["mock-b"], latency=50, cost="0.006", shadow=True))
    records.append(record(12, "team", "cheap", "mock-b", ["mock-b"], latency=50, cost="0.006", route="other@bbbbbb:x"))
    records.append({**record(13, "team", "cheap", None, []), "route": None, "tenant": None})
    # Outside --since/--until.
    records.append(record(14, "team", "cheap", "mock-b", ["mock-b", "mock-a"], latency=900, cost="0.006", day=25))
    return records


@pytest.fixture
def setup(tmp_path: Path, gw_config: dict[str, Any]) -> tuple[Path, Path, Path]:
    config = write_config(tmp_path, gw_config)
    new = tmp_path / "new.yaml"
    new.write_text(NEW_POLICY)
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(json.dumps(r) for r in fixture_records()) + "\n")
    return config, new, audit


def test_simulate_recorded_fixture(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, new, audit = setup
    code = main(["policy", "simulate", "--config", str(config), "--policy", str(new), "--audit", str(audit),
                 "--since", "2026-11-20", "--until", "2026-11-22", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    total = report["total"]
    assert total["requests"] == 10 and total["moved"] == 5
    assert total["moves"] == [{"from": "mock-b", "to": "mock-a", "count": 4},
                              {"from": "(refused)", "to": "mock-a", "count": 1}]
    # Like for like: 4 x $0.006 + 5 x $0.002 before, 9 x $0.002 after.
    assert Decimal(total["cost_before_usd"]) == Decimal("0.034")
    assert Decimal(total["cost_after_usd"]) == Decimal("0.018")
    assert Decimal(total["cost_delta_usd"]) == Decimal("-0.016") and total["cost_delta_pct"] == -47.06
    assert total["newly_admitted"] == 1 and total["newly_refused"] == 0
    # mock-b 800..1100 map quantile for quantile onto mock-a's 100..500.
    assert (total["p95_before_ms"], total["p95_after_ms"], total["p95_delta_ms"]) == (1100.0, 500.0, -600.0)
    team, narrow = report["tenants"]["team"], report["tenants"]["narrow"]
    assert team["moved"] == 5 and Decimal(team["cost_delta_usd"]) == Decimal("-0.016")
    assert narrow["moved"] == 0 and Decimal(narrow["cost_delta_usd"]) == 0 and narrow["cost_delta_pct"] == 0.0
    assert report["models"]["mock-a"]["samples"] == 5 and report["models"]["mock-a"]["p95_ms"] == 500.0
    assert report["policy"].startswith("default@")

    main(["policy", "simulate", "--config", str(config), "--policy", str(new), "--audit", str(audit),
          "--since", "2026-11-20", "--until", "2026-11-22"])
    table = capsys.readouterr().out
    assert "total: 10 requests, 5 would move" in table
    assert "mock-b -> mock-a: 4" in table and "(refused) -> mock-a: 1" in table
    assert "delta $-0.016 (-47.06%)" in table and "1100ms -> 500ms (-600ms)" in table
    assert "tenant narrow: 3 requests, 0 would move" in table


def test_without_window_every_record_is_replayed(setup: tuple[Path, Path, Path]) -> None:
    config, new, audit = setup
    loaded = load_config(config)
    from gateway.simulate import iter_audit_file

    report = simulate(loaded, load_candidate_policy(loaded, new), iter_audit_file(audit))
    assert report["total"]["requests"] == 11 and report["total"]["moves"][0]["count"] == 5


def test_a_policy_naming_unknown_models_is_refused(setup: tuple[Path, Path, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config, new, audit = setup
    new.write_text(NEW_POLICY.replace("[mock-b, mock-a]", "[mock-b, ghost]"))
    code = main(["policy", "simulate", "--config", str(config), "--policy", str(new), "--audit", str(audit)])
    assert code == 1 and f"{new}:8: route cheap: unknown model 'ghost'" in capsys.readouterr().err


def test_simulate_replays_real_traffic_from_the_state_database(
        start_gateway: Callable[..., RunningGateway], capsys: pytest.CaptureFixture[str]) -> None:
    old = {"name": "default", "routes": [
        {"name": "smart", "when": {"model": "smart"}, "candidates": ["mock-b", "mock-a"]},
        {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]}]}
    gw = start_gateway([old])
    c = client(gw)
    for _ in range(3):
        c.chat.completions.create(model="smart", messages=[{"role": "user", "content": "tell me a story"}])
    c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    rows = wait_for(lambda: len(ledger_rows(gw)) == 4 and ledger_rows(gw))
    wait_for(lambda: len([r for r in audit_rows(gw) if r.get("model_served")]) == 4)
    new = gw.config_path.parent / "new.yaml"
    new.write_text("name: default\nroutes:\n  - name: smart\n    when: {model: smart}\n"
                   "    candidates: [mock-a, mock-b]\n  - name: direct\n    when: {model: '*'}\n"
                   "    candidates: ['$requested']\n")
    assert main(["policy", "simulate", "--config", str(gw.config_path), "--policy", str(new), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    total = report["total"]
    assert total["requests"] == 4 and total["moves"] == [{"from": "mock-b", "to": "mock-a", "count": 3}]
    moved = [r for r in rows if r[1] == "mock-b"]
    before = sum(Decimal(r[4]) for r in rows)
    # The same recorded tokens at mock-a's prices ($1 in, $2 out per Mtok).
    after = sum(Decimal(r[4]) for r in rows if r[1] == "mock-a") + sum(
        (Decimal(r[2]) * 1 + Decimal(r[3]) * 2) / Decimal(1_000_000) for r in moved)
    assert Decimal(total["cost_before_usd"]) == before and Decimal(total["cost_after_usd"]) == after
    assert Decimal(total["cost_delta_usd"]) < 0
