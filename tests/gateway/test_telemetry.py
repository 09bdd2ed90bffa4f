"""Traces (OpenTelemetry, GenAI conventions), Prometheus metric names, and log correlation."""
from __future__ import annotations

import http.server
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.audit import read_audit
from gateway.telemetry import LogContext, Telemetry, trace_id_from_header
from tests.gateway.test_e2e_openai import wait_for
from tests.harness import (
    ADMIN_KEY,
    OTHER_KEY,
    TENANT_KEY,
    RunningGateway,
    UpstreamProcess,
    free_port,
    write_config,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PROMPT = "the secret plan is purple elephants"


@pytest.fixture
def traced(gateway: RunningGateway) -> Iterator[tuple[RunningGateway, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway.runtime.telemetry = Telemetry(provider)
    yield gateway, exporter
    provider.shutdown()


def _client(gw: RunningGateway, key: str = TENANT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def test_tracing_is_off_without_an_endpoint(gateway: RunningGateway) -> None:
    assert Telemetry.from_env({}).enabled is False
    assert Telemetry.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}).enabled is True
    assert gateway.runtime.telemetry.enabled is False  # the test environment sets no endpoint
    _client(gateway).chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}],
                                             extra_headers={"traceparent": TRACEPARENT})
    record = wait_for(lambda: read_audit(gateway.runtime.db_path))[0]
    assert record["trace_id"] == TRACE_ID  # the caller's trace id is still kept for correlation
    assert trace_id_from_header("00-" + "0" * 32 + "-" + PARENT_ID + "-01") is None
    assert trace_id_from_header("garbage") is None


def test_request_span_continues_the_caller_trace_with_genai_attributes(
        traced: tuple[RunningGateway, InMemorySpanExporter]) -> None:
    gw, exporter = traced
    completion = _client(gw).chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": PROMPT}], max_tokens=50,
        extra_headers={"traceparent": TRACEPARENT})
    spans = wait_for(lambda: len(exporter.get_finished_spans()) >= 6 and exporter.get_finished_spans())
    named = _by_name(spans)
    root = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert root.name == "chat mock-a"
    assert format(root.context.trace_id, "032x") == TRACE_ID and format(root.parent.span_id, "016x") == PARENT_ID
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "mock-a"
    assert attrs["gen_ai.response.model"] == "up-a" and attrs["gen_ai.provider.name"] == "primary"
    assert attrs["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert attrs["gen_ai.request.max_tokens"] == 50 and attrs["http.response.status_code"] == 200
    assert "error.type" not in attrs and root.status.status_code != StatusCode.ERROR
    for stage in ("gateway.ratelimit", "gateway.budget.balance", "gateway.policy", "gateway.budget.reserve"):
        child = named[stage][0]
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    attempt = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert attempt.parent.span_id == root.context.span_id and attempt.attributes["gateway.attempt.outcome"] == "ok"
    assert attempt.attributes["gen_ai.request.model"] == "up-a"
    for span in spans:  # metadata only: no prompt or completion text anywhere
        for value in span.attributes.values():
            assert PROMPT not in str(value) and completion.choices[0].message.content not in str(value)
    record = wait_for(lambda: read_audit(gw.runtime.db_path))[0]
    assert record["trace_id"] == TRACE_ID


def test_fallback_attempts_and_error_type(traced: tuple[RunningGateway, InMemorySpanExporter],
                                          upstream: UpstreamProcess) -> None:
    gw, exporter = traced
    _client(gw).chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hi"}])
    spans = wait_for(lambda: [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
                     and exporter.get_finished_spans())
    attempts = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert [a.attributes["gateway.model"] for a in attempts][-1] == "mock-a"
    failed = [a for a in attempts if a.attributes["gateway.model"] == "mock-dead"]
    assert failed and failed[0].status.status_code == StatusCode.ERROR and failed[0].attributes["error.type"]
    exporter.clear()
    upstream.script({"status": 500}, {"status": 500}, {"status": 500})
    with pytest.raises(openai.InternalServerError):
        _client(gw).chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    root = wait_for(lambda: [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER])[0]
    assert root.attributes["error.type"] == "upstream_error" and root.status.status_code == StatusCode.ERROR
    assert root.attributes["http.response.status_code"] == 502
    # The failed attempts are kept: in the trace and in the audit record.
    failed = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(failed) == 2 and all(s.status.status_code == StatusCode.ERROR for s in failed)
    record = wait_for(lambda: [r for r in read_audit(gw.runtime.db_path) if r["status"] == 502])[0]
    assert [a["outcome"] for a in record["attempts"]] == ["error", "error"]


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        type(self).bodies.append(self.path.encode() + b" " + self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


def test_otlp_http_export_when_the_endpoint_is_set(tmp_path: Path, gw_config: dict[str, Any],
                                                   upstream: UpstreamProcess) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _Collector.bodies = []
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    path, port = write_config(tmp_path, gw_config), free_port()
    env = {**os.environ, "TEST_UPSTREAM_KEY": "sk-upstream-secret-test", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), timeout=20)
        openai.OpenAI(base_url=f"{base}/v1", api_key=TENANT_KEY, max_retries=0).chat.completions.create(
            model="mock-a", messages=[{"role": "user", "content": PROMPT}], extra_headers={"traceparent": TRACEPARENT})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.shutdown()
    spans = []
    for body in _Collector.bodies:
        route, _, payload = body.partition(b" ")
        assert route == b"/v1/traces"
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    root = next(s for s in spans if s.name == "chat mock-a" and s.kind == 2)  # SPAN_KIND_SERVER
    assert root.trace_id.hex() == TRACE_ID
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["gen_ai.request.model"].string_value == "mock-a" and attrs["gen_ai.usage.output_tokens"].int_value > 0
    assert {"gateway.policy", "gateway.budget.reserve"} <= {s.name for s in spans}
    assert all(PROMPT.encode() not in b for b in _Collector.bodies)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


METRIC_NAMES = [
    "gateway_requests_total", "gateway_route_requests_total", "gateway_request_duration_seconds_bucket",
    "gateway_time_to_first_token_seconds_bucket", "gateway_overhead_seconds_bucket", "gateway_tokens_total",
    "gateway_cost_usd_total", "gateway_upstream_attempts_total", "gateway_fallbacks_total",
    "gateway_rejections_total", "gateway_in_flight_requests", "gateway_policy_reload_total",
    "gateway_budget_remaining_usd", "gateway_budget_remaining_tokens", "gateway_provider_breaker_state",
]


def test_metric_names_units_and_bounded_labels(gw_config: dict[str, Any],
                                               start_gateway: Callable[..., RunningGateway]) -> None:
    gw_config["tenants"][1]["rate_limits"] = {"requests_per_minute": 1}
    gw_config["tenants"][1]["budgets"] = [{"window": "day", "max_tokens": 1}]
    gw_config["tenants"][0]["budgets"].append({"window": "month", "max_tokens": 10_000_000})
    gw_config["providers"].append({"name": "nokey", "type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1",
                                   "api_key_env": "GATEWAY_TEST_KEY_NEVER_SET"})
    gw_config["models"].append({"name": "mock-nokey", "provider": "nokey", "upstream_model": "x"})
    gw = start_gateway()
    c = _client(gw)
    c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    list(c.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}], stream=True))
    c.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hi"}])  # dead -> fallback
    narrow = _client(gw, OTHER_KEY)
    with pytest.raises(openai.RateLimitError):  # over its 1-token budget
        narrow.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError):  # over 1 request per minute
        narrow.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])
    policy = gw.config_path.parent / "policies" / "default.yaml"
    policy.write_text(policy.read_text() + "# edited\n")
    assert httpx.post(f"{gw.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    text = httpx.get(f"{gw.url}/metrics").text
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), f"{name} missing"
    assert 'gateway_rejections_total{reason="budget",tenant="narrow"} 1.0' in text
    assert 'gateway_rejections_total{reason="rate_limit",tenant="narrow"} 1.0' in text
    assert 'gateway_fallbacks_total{route="default:flaky"} 1.0' in text
    assert 'gateway_upstream_attempts_total{model="mock-dead",outcome="error",provider="dead"} 2.0' in text
    assert re.search(r'gateway_tokens_total\{model="mock-a",tenant="team",type="output"\} [1-9]', text)
    assert re.search(r'gateway_budget_remaining_usd\{tenant="team",window="day"\} 99\.9', text)
    assert 'gateway_budget_remaining_tokens{tenant="team",window="month"}' in text
    assert 'gateway_provider_breaker_state{provider="nokey"} 1.0' in text  # its key env is unset: skipped
    assert 'gateway_provider_breaker_state{provider="primary"} 0.0' in text
    assert 'gateway_route_requests_total{provider="primary",route="default:direct",status="2xx"} 2.0' in text
    allowed = {"tenant": {"team", "narrow", "-"}, "model": {"mock-a", "mock-b", "mock-dead", "mock-embed", "mock-nokey", "-"},
               "provider": {"primary", "hosted", "dead", "nokey", "-"}, "status": {"2xx", "4xx", "5xx"},
               "type": {"input", "output", "cached_input"}, "reason": {"budget", "rate_limit"},
               "window": {"day", "month"}}
    for key, value in re.findall(r'(\w+)="([^"]*)"', text):
        if key in allowed:
            assert value in allowed[key], f"unbounded label {key}={value}"
    assert "req_" not in text and TENANT_KEY not in text


def test_json_logs_carry_request_and_trace_ids(gateway: RunningGateway, upstream: UpstreamProcess,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(LogContext())
    upstream.script({"text": "one two three four five six seven", "cut_after_chunks": 2})
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", timeout=10,
                      headers={"authorization": f"Bearer {TENANT_KEY}", "traceparent": TRACEPARENT,
                               "x-request-id": "req-log-test-1"},
                      json={"model": "mock-a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        r.read()
        gateway_id = r.headers["x-gateway-request-id"]  # logs carry the gateway's unique id (the audit's and ledger's)
        assert r.headers["x-request-id"] == "req-log-test-1" != gateway_id
    record = wait_for(lambda: [r for r in caplog.records if r.getMessage() == "upstream stream failed"])[0]
    assert record.request_id == gateway_id and record.trace_id == TRACE_ID
    from gateway.logs import JsonFormatter

    line = JsonFormatter().format(record)
    assert f'"trace_id":"{TRACE_ID}"' in line and f'"request_id":"{gateway_id}"' in line


def _cut_stream(gw_v1: str, headers: dict[str, str]) -> str:
    """A streamed chat the upstream cuts short (the gateway logs a warning); its gateway request id."""
    with httpx.stream("POST", f"{gw_v1}/chat/completions", timeout=10,
                      headers={"authorization": f"Bearer {TENANT_KEY}", **headers},
                      json={"model": "mock-a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        r.read()
        return r.headers["x-gateway-request-id"]


def test_serve_json_logs_carry_a_trace_id_with_or_without_traceparent(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    """Tracing off: the caller's trace id is kept, and one is minted when the caller sent none."""
    from tests.gatewayprocs import GatewayProcess
    from tests.harness import base_config

    node = GatewayProcess(write_config(tmp_path, base_config(upstream.url, tmp_path)), tmp_path / "serve.log",
                          env={"GATEWAY_LOG_JSON": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""})
    try:
        ids = []
        for headers in ({"traceparent": TRACEPARENT}, {}, {}):
            upstream.script({"text": "one two three four five six seven", "cut_after_chunks": 2})
            ids.append(_cut_stream(node.v1, headers))
        records = wait_for(lambda: len(read_audit(tmp_path / "state.db")) == 3 and read_audit(tmp_path / "state.db"))
    finally:
        assert node.stop() == 0
    import orjson

    lines = [orjson.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    per_request = [line for line in lines if "request_id" in line]
    assert len(per_request) >= 3  # one warning per cut stream at least
    for line in per_request:  # every line logged while serving a request names it and its trace
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and line["trace_id"] != "0" * 32, line
    warned = {line["request_id"]: line["trace_id"] for line in per_request if line["msg"] == "upstream stream failed"}
    assert set(warned) == set(ids)
    assert warned[ids[0]] == TRACE_ID  # the caller's
    assert len({warned[ids[1]], warned[ids[2]], TRACE_ID}) == 3  # minted: a new one per request
    audit = {r["request_id"]: r["trace_id"] for r in records}
    assert audit == warned  # the audit record carries the same trace id as the logs
