"""Active health checks (gateway/health.py): the probe, the state machine, and a running gateway
that skips a provider while its health URL is down and takes it back when it answers again."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

from gateway.explain import explain
from gateway.health import (
    TIMEOUTS_BEFORE_DOWN,
    ProbeResult,
    ProviderHealth,
    next_state,
    probe,
)
from tests.harness import (
    DEFAULT_POLICY,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
    free_port,
)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b'{"object": "list", "data": []}'
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


class HealthServer:
    """A stdlib HTTP server that can be stopped and started again on the same port."""

    def __init__(self, port: int, status: int = 200) -> None:
        self.port, self.status = port, status
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Health)
        server.status = self.status  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer(free_port())
    yield server
    server.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


UP = ProviderHealth("p", "http://x/models")
REFUSED = ProbeResult(False, "connection refused")
SLOW = ProbeResult(False, "no answer within 3s", timed_out=True)


@pytest.mark.parametrize(("results", "healthy", "reason"), [
    ([ProbeResult(True)], True, ""),
    ([REFUSED], False, "connection refused"),
    ([REFUSED, ProbeResult(True)], True, ""),
    ([ProbeResult(False, "answered HTTP 503")], False, "answered HTTP 503"),
    ([SLOW] * (TIMEOUTS_BEFORE_DOWN - 1), True, ""),
    ([SLOW] * TIMEOUTS_BEFORE_DOWN, False, f"no answer within 3s ({TIMEOUTS_BEFORE_DOWN} probes in a row)"),
    ([SLOW, ProbeResult(True)] * TIMEOUTS_BEFORE_DOWN, True, ""),
])
def test_state_machine(results: list[ProbeResult], healthy: bool, reason: str) -> None:
    state = UP
    for i, result in enumerate(results):
        state = next_state(state, result, float(i))
    assert (state.healthy, state.reason, state.checked) == (healthy, reason, True)


async def test_probe_outcomes(health_server: HealthServer) -> None:
    url = f"http://127.0.0.1:{health_server.port}/v1/models"
    assert await probe(url, timeout_s=1) == ProbeResult(False, "connection refused")
    health_server.start()
    assert await probe(url, timeout_s=1) == ProbeResult(True)
    health_server.stop()
    failing = HealthServer(health_server.port, status=503)
    failing.start()
    try:
        assert await probe(url, timeout_s=1) == ProbeResult(False, "answered HTTP 503")
    finally:
        failing.stop()


async def test_probe_times_out_on_a_silent_server() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = await probe(f"http://127.0.0.1:{port}/models", timeout_s=0.2)
    assert result == ProbeResult(False, "no answer within 0.2s", timed_out=True)


def _checked_config(gw_config: dict[str, Any], upstream: UpstreamProcess, health_port: int) -> None:
    """Provider `checked`: requests go to the fake upstream, health to `health_server`."""
    gw_config["providers"].append({
        "name": "checked", "type": "openai_compatible", "base_url": f"{upstream.url}/v1", "locality": "local",
        "health_check_interval_s": 0.1, "health_check_timeout_s": 1,
        "health_check_url": f"http://127.0.0.1:{health_port}/v1/models"})
    gw_config["models"].append({"name": "mock-checked", "provider": "checked", "upstream_model": "up-checked",
                                "data_boundary": "local", "max_output_tokens": 256})


POLICY = {**DEFAULT_POLICY, "routes": [
    {"name": "local-first", "when": {"model": "local-first"}, "candidates": ["mock-checked", "mock-b"]},
    *DEFAULT_POLICY["routes"]]}


def _available(gw: RunningGateway) -> bool:
    models = httpx.get(f"{gw.v1}/models", headers={"authorization": f"Bearer {TENANT_KEY}"}).json()["data"]
    return next(m for m in models if m["id"] == "mock-checked")["gateway"]["available"]


def test_gateway_skips_a_down_provider_and_takes_it_back(
        gw_config: dict[str, Any], upstream: UpstreamProcess, health_server: HealthServer,
        start_gateway: Callable[..., RunningGateway]) -> None:
    _checked_config(gw_config, upstream, health_server.port)
    gw = start_gateway([POLICY])  # the health URL is down from the start
    assert not _available(gw)
    client = openai.OpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="local-first", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-b"
    assert [a["model"] for a in upstream.attempts()] == ["up-b"]  # no attempt at the down provider
    result = explain(gw.runtime.loaded, "team", "local-first", None,
                     live_catalog=gw.runtime.catalog, health=gw.runtime.health.states)
    assert result["chosen"] == "mock-b"
    assert result["rejected"] == [{"model": "mock-checked", "reason":
                                   f"unhealthy: health check GET http://127.0.0.1:{health_server.port}"
                                   "/v1/models: connection refused"}]

    health_server.start()
    wait_until(lambda: _available(gw), timeout=5)
    upstream.reset()
    raw = client.chat.completions.with_raw_response.create(
        model="local-first", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "mock-checked"
    assert [a["model"] for a in upstream.attempts()] == ["up-checked"]

    health_server.stop()
    wait_until(lambda: not _available(gw), timeout=5)
    assert gw.runtime.health.states["checked"].reason in ("connection refused", "connection reset")
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'gateway_provider_up{provider="checked"} 0.0' in metrics


def test_providers_without_health_checks_are_not_probed(gateway: RunningGateway, upstream: UpstreamProcess) -> None:
    time.sleep(0.3)
    assert gateway.runtime.health.states == {}
    assert upstream.attempts() == []
