"""Every shipped config in deploy/ loads, and its policies' tests pass (no model server needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.explain import run_all_policy_tests
from tests.harness import ROOT

CONFIGS = sorted([ROOT / "deploy" / "quickstart.yaml", *(ROOT / "deploy" / "examples").glob("*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_policy_tests_pass(path: Path) -> None:
    loaded = load_config(path)
    results = list(run_all_policy_tests(loaded))
    assert results and [r for r in results if not r[3]] == []
    local = [p for p in loaded.providers.values() if p.locality == "local"]
    assert local and all(p.health_check_interval_s for p in local)  # local servers are health-checked
    assert {m.name for m in loaded.models.values()} >= {"llama-local", "gpt-4o-mini", "claude-haiku"}
