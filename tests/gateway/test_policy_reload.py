"""Policy hot reload: file edits, POST /admin/reload and SIGHUP; bad files are rejected with
file:line and counted while the last good version serves; reloads under concurrent traffic
never fail a request or mix versions."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.test_e2e_openai import wait_for
from tests.harness import (
    ADMIN_KEY,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
    free_port,
    write_config,
)

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"authorization": f"Bearer {TENANT_KEY}"}
# Two versions of one policy, the same size: `fast` prefers mock-a in A and mock-b in B.
VERSION_A = """\
name: default
routes:
  - name: fast
    when: {model: fast}
    candidates: [mock-a, mock-b]
  - name: direct
    when: {model: "*"}
    candidates: ["$requested"]
"""
VERSION_B = VERSION_A.replace("[mock-a, mock-b]", "[mock-b, mock-a]")
BAD = VERSION_A.replace("  - name: direct\n", "  - name: direct\n    colour: blue\n")
EXPECTED = {"mock-a": VERSION_A, "mock-b": VERSION_B}


def version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def policy_path(gw_config_path: Path) -> Path:
    return gw_config_path.parent / "policies" / "default.yaml"


def ask(base: str, model: str = "fast", timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=AUTH, timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def served(resp: httpx.Response) -> tuple[str, str]:
    """(policy version, model) of an answer."""
    label = resp.headers["x-gateway-route"]
    return label.split("@", 1)[1].split(":", 1)[0], resp.headers["x-gateway-model"]


def reload_count(base: str, result: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f'gateway_policy_reload_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    gw_config["tenants"][0]["rate_limits"] = {"requests_per_minute": 1_000_000}  # traffic tests run hot
    gateway = start_gateway()
    policy_path(gateway.config_path).write_text(VERSION_A)
    httpx.post(f"{gateway.url}/admin/reload", headers=ADMIN).raise_for_status()
    return gateway


def test_editing_the_file_reloads_it(gw: RunningGateway) -> None:
    assert served(ask(gw.url)) == (version(VERSION_A), "mock-a")
    before = reload_count(gw.url, "success")
    policy_path(gw.config_path).write_text(VERSION_B)
    wait_for(lambda: served(ask(gw.url)) == (version(VERSION_B), "mock-b"), timeout=5)
    assert reload_count(gw.url, "success") == before + 1
    assert httpx.get(f"{gw.url}/readyz").json()["policies"] == ["default"]


def test_invalid_file_is_rejected_and_the_last_good_version_serves(
        gw: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    path = policy_path(gw.config_path)
    path.write_text(BAD)
    wait_for(lambda: reload_count(gw.url, "failure") == 1, timeout=5)  # the poller saw it
    line = BAD.splitlines().index("    colour: blue") + 1
    assert any(f"{path}:{line}: routes.1: unknown key 'colour'" in str(r.__dict__.get("errors"))
               for r in caplog.records if r.name == "gateway.reload")
    resp = httpx.post(f"{gw.url}/admin/reload", headers=ADMIN)
    assert resp.status_code == 422
    body = resp.json()
    assert body["result"] == "failure" and body["errors"] == [f"{path}:{line}: routes.1: unknown key 'colour'"]
    assert body["policies"] == {"default": version(VERSION_A)}  # still serving
    assert served(ask(gw.url)) == (version(VERSION_A), "mock-a")
    assert reload_count(gw.url, "failure") == 2

    path.write_text(VERSION_A.replace("[mock-a, mock-b]", "[mock-a, ghost]"))
    resp = httpx.post(f"{gw.url}/admin/reload", headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["errors"] == [
        f"{path}:5: route fast: unknown model 'ghost'"]
    path.unlink()  # the tenants' policy is gone: refused too
    resp = httpx.post(f"{gw.url}/admin/reload", headers=ADMIN)
    assert resp.status_code == 422 and "no policy named 'default'" in resp.json()["errors"][0]
    assert served(ask(gw.url)) == (version(VERSION_A), "mock-a")

    path.write_text(VERSION_B)
    resp = httpx.post(f"{gw.url}/admin/reload", headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["result"] in ("success", "unchanged")
    assert served(ask(gw.url)) == (version(VERSION_B), "mock-b")
    again = httpx.post(f"{gw.url}/admin/reload", headers=ADMIN).json()
    assert again == {"result": "unchanged", "source": "admin", "policies": {"default": version(VERSION_B)},
                     "errors": []}
    tenant = httpx.post(f"{gw.url}/admin/reload", headers=AUTH)
    assert tenant.status_code == 401


def test_reload_under_concurrent_traffic_never_fails_or_mixes_versions(gw: RunningGateway) -> None:
    by_version = {version(VERSION_A): "mock-a", version(VERSION_B): "mock-b"}
    seen: list[tuple[int, str, str]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def traffic() -> None:
        with httpx.Client(headers=AUTH, timeout=10) as http:
            while not stop.is_set():
                resp = http.post(f"{gw.v1}/chat/completions",
                                 json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
                with lock:
                    if resp.status_code != 200:
                        seen.append((resp.status_code, resp.text, ""))
                    else:
                        seen.append((resp.status_code, *served(resp)))

    threads = [threading.Thread(target=traffic) for _ in range(6)]
    for t in threads:
        t.start()
    path = policy_path(gw.config_path)
    try:
        for i in range(12):
            path.write_text(VERSION_B if i % 2 == 0 else VERSION_A)
            assert httpx.post(f"{gw.url}/admin/reload", headers=ADMIN).status_code == 200
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert len(seen) > 50
    assert [s for s in seen if s[0] != 200] == []
    assert all(by_version[v] == model for _, v, model in seen)  # each answer is wholly one version
    assert {v for _, v, _ in seen} == set(by_version)


def test_in_flight_request_keeps_the_version_it_started_with(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"delay_ms": 1200})
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(slow=ask(gw.url)))
    thread.start()
    wait_for(lambda: upstream.attempts(), timeout=5)  # decided and dispatched under A
    policy_path(gw.config_path).write_text(VERSION_B)
    assert httpx.post(f"{gw.url}/admin/reload", headers=ADMIN).json()["result"] == "success"
    assert served(ask(gw.url)) == (version(VERSION_B), "mock-b")
    thread.join(10)
    assert result["slow"].status_code == 200
    assert served(result["slow"]) == (version(VERSION_A), "mock-a")


def test_sighup_reloads_a_serving_process(tmp_path: Path, gw_config: dict[str, Any], upstream: UpstreamProcess) -> None:
    config = write_config(tmp_path, gw_config)
    path = policy_path(config)
    path.write_text(VERSION_A)
    port = free_port()
    env = {**os.environ, "TEST_UPSTREAM_KEY": "sk-upstream-secret-test"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), timeout=20)
        assert served(ask(base)) == (version(VERSION_A), "mock-a")
        # Same size and mtime: the file poller cannot notice, so only SIGHUP can reload it.
        stat = path.stat()
        path.write_text(VERSION_B)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(1.5)
        assert served(ask(base)) == (version(VERSION_A), "mock-a")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served(ask(base)) == (version(VERSION_B), "mock-b"), timeout=5)
        assert proc.poll() is None  # SIGHUP did not stop it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0
    assert '"source": "sighup"' in err or '"source":"sighup"' in err


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
