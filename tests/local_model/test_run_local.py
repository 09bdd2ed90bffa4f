"""`make run` itself: scripts/run_local.py as a subprocess on a copy of deploy/quickstart.yaml
(state under the test's directory, free ports), with no hosted keys set. It starts the real
llama.cpp server and the gateway, prints a snippet with a working tenant key, and on Ctrl-C
(SIGINT) or SIGTERM stops both children and exits 0."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.harness import ROOT, free_port

pytestmark = pytest.mark.local_model

HOSTED_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
HI: Any = [{"role": "user", "content": "Say hello."}]


def quickstart_copy(tmp: Path) -> tuple[Path, int]:
    """deploy/quickstart.yaml and its policies, with the state under `tmp` and the model server on a free port."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "quickstart.yaml").read_text())
    model_port = free_port()
    config["state"]["database_url"] = f"sqlite:///{tmp / 'state' / 'state.db'}"
    for provider in config["providers"]:
        if provider["locality"] == "local":
            provider["base_url"] = f"http://127.0.0.1:{model_port}/v1"
            provider["health_check_url"] = f"http://127.0.0.1:{model_port}/docs"
    shutil.copytree(ROOT / "deploy" / "policies", tmp / "policies")
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, model_port


class RunLocal:
    """scripts/run_local.py running, its output collected as it comes."""

    def __init__(self, config: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HOSTED_KEY_ENVS}  # a first run: no keys
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 180) -> tuple[str, str]:
        """(base URL, tenant key) from the printed snippet."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            base = re.search(r'OpenAI\(base_url="(http://[^"]+)/v1", api_key="(gw-[^"]+)"\)', self.output)
            if base:
                return base.group(1), base.group(2)
            if self.proc.poll() is not None:
                raise AssertionError(f"run_local.py exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no snippet within {timeout_s}s:\n{self.output}")

    def children(self) -> dict[str, int]:
        """The model server's and the gateway's pids (the script's direct children)."""
        found: dict[str, int] = {}
        for pid in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "llama_cpp.server" in cmdline:
                found["llama"] = int(pid)
            elif "gateway serve" in cmdline:
                found["gateway"] = int(pid)
        return found

    def stop(self, sig: int, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run_local.py did not stop within {timeout_s}s:\n{self.output}") from None
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """Test clean-up only: the script and whatever children are left."""
        if self.proc.poll() is None:
            pids = self.children().values()
            self.proc.kill()
            self.proc.wait(10)
            for pid in pids:
                _kill_quietly(pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_make_run_prints_a_working_key_and_ctrl_c_stops_both(model_file: Path, tmp_path: Path) -> None:
    config, model_port = quickstart_copy(tmp_path)
    port = free_port()
    run = RunLocal(config, port)
    try:
        base, key = run.wait_ready()
        assert base == f"http://127.0.0.1:{port}"
        children = run.children()
        assert set(children) == {"llama", "gateway"}, run.output
        saved = tmp_path / "state" / "quickstart-demo.key"
        assert saved.read_text().strip() == key and saved.stat().st_mode & 0o777 == 0o600  # state under tmp
        assert (tmp_path / "state" / "llama-server.log").stat().st_size > 0

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(model="fast", max_tokens=8, messages=HI)
        reply = raw.parse()
        assert raw.headers["x-gateway-model"] == "llama-local" and reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0

        assert run.stop(signal.SIGINT) == 0, run.output
    finally:
        run.kill()
    assert "stopping: the gateway drains, then the model server stops" in run.output
    assert _gone(children["gateway"]) and _gone(children["llama"])
    assert not _listening(port) and not _listening(model_port)

    again = RunLocal(config, free_port())  # the next `make run` reuses the saved key while it is valid
    try:
        assert again.wait_ready()[1] == key
        children = again.children()
        assert again.stop(signal.SIGTERM) == 0, again.output
    finally:
        again.kill()
    assert _gone(children["gateway"]) and _gone(children["llama"])


def test_first_run_without_hosted_keys_smart_falls_back_to_the_local_model(model_file: Path, tmp_path: Path) -> None:
    config, _ = quickstart_copy(tmp_path)
    run = RunLocal(config, free_port())
    try:
        base, key = run.wait_ready()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(model="smart", max_tokens=8, messages=HI)
        assert raw.headers["x-gateway-model"] == "llama-local"  # the hosted ones are unavailable, not errors
        assert raw.headers["x-gateway-route"].endswith(":smart") and raw.headers["x-gateway-attempts"] == "1"
        assert raw.parse().choices[0].message.content
        meta = {m.id: (m.model_extra or {})["gateway"] for m in client.models.list()}
        assert meta["gpt-4o-mini"] == {"kind": "model", "available": False, "reason": "OPENAI_API_KEY not set"}
        assert meta["claude-haiku"] == {"kind": "model", "available": False, "reason": "ANTHROPIC_API_KEY not set"}
        assert meta["smart"] == {"kind": "alias", "available": True}
        assert meta["llama-local"] == {"kind": "model", "available": True}
        assert run.stop(signal.SIGINT) == 0, run.output
    finally:
        run.kill()
