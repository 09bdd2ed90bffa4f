"""Shared pieces of the fault tests (tests/gateway/test_faults_*.py): config edits, SDK clients,
audit/ledger/metrics readers, all against the real fake upstream process on 127.0.0.1."""
from __future__ import annotations

import sqlite3
from typing import Any

import anthropic
import httpx
import openai

from tests.gateway.test_e2e_openai import audit_rows, wait_for
from tests.harness import ADMIN_KEY, DEFAULT_POLICY, TENANT_KEY, RunningGateway

__all__ = ["audit_rows", "wait_for"]

HI: list[Any] = [{"role": "user", "content": "hi"}]
WORDS = " ".join(f"w{i}" for i in range(40))


def oc(gw: RunningGateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=kw.pop("max_retries", 0), **kw)


def ac(gw: RunningGateway, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=kw.pop("max_retries", 0), **kw)


def add_models(config: dict[str, Any], upstream_url: str) -> None:
    """Beyond the harness's mock-a (primary), mock-b (hosted), mock-dead (nothing listens):
    mock-c on a third provider, mock-big (a large context window) and claude-a (Anthropic)."""
    config["providers"] += [
        {"name": "third", "type": "openai_compatible", "base_url": f"{upstream_url}/v1",
         "api_key_env": "TEST_UPSTREAM_KEY", "locality": "local", "timeout_s": 10},
        {"name": "anthro", "type": "anthropic", "base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY",
         "timeout_s": 10},
    ]
    config["models"] += [
        {"name": "mock-c", "provider": "third", "upstream_model": "up-c", "max_output_tokens": 256,
         "data_boundary": "local", "capabilities": ["chat", "tools", "json"]},
        {"name": "mock-big", "provider": "third", "upstream_model": "up-big", "max_output_tokens": 256,
         "context_window": 128000, "data_boundary": "local", "capabilities": ["chat", "tools", "json"]},
        {"name": "claude-a", "provider": "anthro", "upstream_model": "claude-mock", "max_output_tokens": 256,
         "input_usd_per_mtok": 3, "output_usd_per_mtok": 15, "capabilities": ["chat", "tools", "json"]},
    ]


def policy(*routes: dict[str, Any]) -> list[dict[str, Any]]:
    """The default policy with these routes first."""
    return [{**DEFAULT_POLICY, "routes": [*routes, *DEFAULT_POLICY["routes"]]}]


def route(name: str, candidates: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "when": {"model": name}, "candidates": candidates, "objective": "ordered", **extra}


def oa_error(status: int, code: str, message: str = "upstream says no") -> dict[str, Any]:
    return {"status": status, "body": {"error": {"message": message, "type": "invalid_request_error", "code": code}}}


def post_chat(gw: RunningGateway, model: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=20,
                      json={"model": model, "messages": HI, **body})


def explain(gw: RunningGateway, model: str) -> dict[str, Any]:
    resp = httpx.post(f"{gw.url}/admin/explain", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      json={"tenant": "team", "model": model}, timeout=10)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def metrics(gw: RunningGateway) -> str:
    return httpx.get(f"{gw.url}/metrics", timeout=10).text


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition text, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def upstream_models(attempts: list[dict[str, Any]]) -> list[str | None]:
    return [a["model"] for a in attempts]


def ledger(gw: RunningGateway) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(gw.runtime.db_path)
    try:
        return conn.execute("SELECT request_id, model, input_tokens, output_tokens, status, usage_estimated "
                            "FROM ledger_entries ORDER BY rowid").fetchall()
    finally:
        conn.close()
