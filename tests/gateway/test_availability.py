"""Providers whose key env var is unset are unavailable, not errors: `/v1/models` says so in
its `gateway` metadata (with the reason), aliases are available while any candidate is, and
`gateway check` lists what the config alone leaves unusable."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.cli import main
from tests.harness import DEFAULT_POLICY, ROOT, TENANT_KEY, RunningGateway, write_config

NO_KEY_ENV = "GATEWAY_TEST_KEY_NEVER_SET"
POLICY: dict[str, Any] = {
    "name": "default",
    "routes": [
        {"name": "hosted-only", "when": {"model": "hosted-only"}, "candidates": ["mock-nokey", "mock-nokey-2"]},
        {"name": "smart", "when": {"model": "smart"}, "candidates": ["mock-nokey", "mock-a"], "objective": "ordered"},
        *DEFAULT_POLICY["routes"],
    ],
}


@pytest.fixture
def keyless(gw_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv(NO_KEY_ENV, raising=False)
    gw_config["providers"].append({"name": "nokey", "type": "openai", "base_url": "http://127.0.0.1:9/v1",
                                   "api_key_env": NO_KEY_ENV, "locality": "hosted"})
    for name in ("mock-nokey", "mock-nokey-2"):
        gw_config["models"].append({"name": name, "provider": "nokey", "upstream_model": "x",
                                    "input_usd_per_mtok": 1, "output_usd_per_mtok": 1})
    return gw_config


def test_models_list_shows_unavailable_models_and_aliases_with_reasons(
        keyless: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway([POLICY])
    client = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    meta = {m.id: (m.model_extra or {})["gateway"] for m in client.models.list()}
    reason = f"{NO_KEY_ENV} not set"
    assert meta["mock-nokey"] == {"kind": "model", "available": False, "reason": reason}
    assert meta["mock-nokey-2"] == {"kind": "model", "available": False, "reason": reason}
    assert meta["mock-a"] == {"kind": "model", "available": True}
    assert meta["hosted-only"] == {"kind": "alias", "available": False, "reason":
                                   f"no candidate is available: mock-nokey: {reason}; mock-nokey-2: {reason}"}
    assert meta["smart"] == {"kind": "alias", "available": True}  # falls back to mock-a
    assert meta["fast"] == {"kind": "alias", "available": True}
    # Not an error at request time: the alias routes past the keyless model.
    raw = client.chat.completions.with_raw_response.create(model="smart", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-a"


def test_check_lists_unavailable_models_and_aliases(keyless: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, keyless, [POLICY])
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"warning: provider 'nokey': ${NO_KEY_ENV} is not set (unavailable until it is)" in out
    assert f"unavailable: model 'mock-nokey': {NO_KEY_ENV} not set" in out
    assert f"unavailable: model 'mock-nokey-2': {NO_KEY_ENV} not set" in out
    assert (f"unavailable: alias 'hosted-only' (policy default): no candidate is available: "
            f"mock-nokey: {NO_KEY_ENV} not set; mock-nokey-2: {NO_KEY_ENV} not set") in out
    assert "available: alias 'smart' (policy default) through mock-a; mock-nokey unavailable" in out
    assert not [line for line in out if "'mock-a'" in line or "'fast'" in line]
    assert out[-1].startswith("ok: ")


def test_quickstart_check_without_hosted_keys(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for env in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    assert main(["check", "--config", str(ROOT / "deploy" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "unavailable: model 'gpt-4o-mini': OPENAI_API_KEY not set" in out
    assert "unavailable: model 'claude-haiku': ANTHROPIC_API_KEY not set" in out
    assert "available: alias 'smart' (policy default) through llama-local; gpt-4o-mini, claude-haiku unavailable" in out
    assert "available: alias 'fast' (policy default) through llama-local; gpt-4o-mini unavailable" in out
    assert not [line for line in out if "llama-local'" in line]  # the local model needs no key
