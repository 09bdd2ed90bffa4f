"""End-to-end harness: a real fake upstream process and a real gateway (uvicorn) on 127.0.0.1."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.app import create_app
from gateway.config import load_config
from gateway.runtime import Runtime
from gateway.settings import Settings

TENANT_KEY = "gw-test-key-0123456789"
OTHER_KEY = "gw-other-key-0123456789"
ADMIN_KEY = "admin-test-key"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UpstreamProcess:
    """tests/fakeupstream.py in its own process, scripted over HTTP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fakeupstream.py"), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def script(self, *behaviours: dict[str, Any]) -> None:
        self.http.post("/__script", json=list(behaviours)).raise_for_status()

    def attempts(self) -> list[dict[str, Any]]:
        data = self.http.get("/__attempts").json()
        return data["attempts"] if isinstance(data, dict) else data

    def reset(self) -> None:
        self.http.post("/__reset").raise_for_status()

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def base_config(upstream_url: str, tmp: Path) -> dict[str, Any]:
    dead_port = free_port()  # nothing listens there: connect errors
    return {
        "state": {"database_url": f"sqlite:///{tmp / 'state.db'}"},
        "audit": {"log_bodies": False},
        "providers": [
            {"name": "primary", "type": "openai_compatible", "base_url": f"{upstream_url}/v1",
             "api_key_env": "TEST_UPSTREAM_KEY", "locality": "local", "timeout_s": 10},
            {"name": "hosted", "type": "openai", "base_url": f"{upstream_url}/v1",
             "api_key_env": "TEST_UPSTREAM_KEY", "locality": "hosted", "timeout_s": 10},
            {"name": "dead", "type": "openai_compatible", "base_url": f"http://127.0.0.1:{dead_port}/v1",
             "locality": "local", "timeout_s": 5, "connect_timeout_s": 1},
        ],
        "models": [
            {"name": "mock-a", "provider": "primary", "upstream_model": "up-a", "input_usd_per_mtok": 1,
             "output_usd_per_mtok": 2, "max_output_tokens": 256, "data_boundary": "local",
             "capabilities": ["chat", "tools", "json"]},
            {"name": "mock-b", "provider": "hosted", "upstream_model": "up-b", "input_usd_per_mtok": 3,
             "output_usd_per_mtok": 6, "max_output_tokens": 256, "quality": 2,
             "capabilities": ["chat", "tools", "json"]},
            {"name": "mock-dead", "provider": "dead", "upstream_model": "up-dead", "max_output_tokens": 256,
             "data_boundary": "local", "capabilities": ["chat", "tools"]},
            {"name": "mock-embed", "provider": "primary", "upstream_model": "up-embed",
             "input_usd_per_mtok": "0.02", "output_usd_per_mtok": 0, "capabilities": ["embeddings"],
             "data_boundary": "local"},
        ],
        "tenants": [
            {"id": "team", "api_keys_sha256": [hashlib.sha256(TENANT_KEY.encode()).hexdigest()],
             "policy": "default", "allowed_models": ["*"], "data_class": "internal",
             "budgets": [{"window": "day", "max_usd": 100}], "rate_limits": {"requests_per_minute": 1000}},
            {"id": "narrow", "api_keys_sha256": [hashlib.sha256(OTHER_KEY.encode()).hexdigest()],
             "policy": "default", "allowed_models": ["mock-a"], "data_class": "internal"},
        ],
        "policies_dir": "policies/",
        "admin_api_key_env": "TEST_GATEWAY_ADMIN_KEY",
    }


DEFAULT_POLICY: dict[str, Any] = {
    "name": "default",
    "routes": [
        {"name": "fast", "when": {"model": "fast"}, "candidates": ["mock-a", "mock-b"], "objective": "ordered"},
        {"name": "cheap", "when": {"model": "cheap"}, "candidates": ["mock-b", "mock-a"], "objective": "cheapest"},
        {"name": "flaky", "when": {"model": "flaky"}, "candidates": ["mock-dead", "mock-a"]},
        {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]},
    ],
}


def write_config(tmp: Path, config: dict[str, Any], policies: list[dict[str, Any]] | None = None) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    for policy in policies or [DEFAULT_POLICY]:
        (tmp / "policies" / f"{policy['name']}.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class RunningGateway:
    url: str
    runtime: Runtime
    config_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def run_gateway(config_path: Path, **settings: Any) -> Iterator[RunningGateway]:
    os.environ.setdefault("TEST_UPSTREAM_KEY", "sk-upstream-secret-test")
    os.environ["TEST_GATEWAY_ADMIN_KEY"] = ADMIN_KEY
    port = free_port()
    values: dict[str, Any] = {"flush_interval_s": 0.02, "keys_refresh_s": 0.5, **settings}
    rt = Runtime(load_config(config_path), Settings(host="127.0.0.1", port=port, **values), sleep=_no_wait)
    server = uvicorn.Server(uvicorn.Config(
        create_app(rt), host="127.0.0.1", port=port, loop="asyncio", http="h11", lifespan="on",
        log_config=None, access_log=False,
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)
    try:
        yield RunningGateway(f"http://127.0.0.1:{port}", rt, config_path)
    finally:
        server.should_exit = True
        thread.join(20)


async def _no_wait(seconds: float) -> None:
    """Backoff sleeps are injected: tests never wait for them."""
    await asyncio.sleep(0)
