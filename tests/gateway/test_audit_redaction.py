"""Secrets and PII: the detector table, and the end-to-end promise that with
`audit.log_bodies: true` bodies are stored redacted and no value lands in any file or log line."""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.audit import read_audit, redact_body
from gateway.logs import JsonFormatter
from gateway.sensitive import KINDS, Finding, find_sensitive, redact
from tests.gateway.test_e2e_openai import wait_for
from tests.gatewayprocs import GatewayProcess
from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess, write_config

PEM_BODY = "MIIEpAIBAAKCAQEA7bq98BtxsuX3rTQmRfKcGkZ0vWJ1xSg4Hn2cUu8Lq0yNfP3aTe5rD"
CORPUS: list[tuple[str, str]] = [
    ("AWS_KEY", "AKIAZ3MXQ7RVJ2KLP4WD"),
    ("AWS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),  # after aws_secret_access_key=
    ("OPENAI_KEY", "sk-proj-Q8v2XbL0mN4pR7tY1uW3zA5cD9eF6gH2jK"),
    ("OPENAI_KEY", "sk-4fJx9QmZ2LrT8vWc1BnY6HdKp3SgE7aU0oIi5XyR"),
    ("ANTHROPIC_KEY", "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa-AAAA"),
    ("JWT", ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
             "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")),
    ("PRIVATE_KEY", f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\nQ2Fyb2wgU2VjcmV0\n-----END RSA PRIVATE KEY-----"),
    ("EMAIL", "jane.doe+billing@example-corp.com"),
    ("PHONE", "+44 20 7946 0958"),
    ("PHONE", "(415) 555-0132"),
    ("CARD", "4539 1488 0343 6467"),
    ("CARD", "5555555555554444"),
    ("CARD", "3782-822463-10005"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "DE89370400440532013000"),
    ("GENERIC_SECRET", "ghp_R2d2C3p0L8k9J7h6G5f4D3s2A1q0W9e8R7t6"),
]
CLEAN = [
    "Summarise the Q3 report: revenue grew 12.5% to 1,234,567 USD on 2024-05-01 at 10:30.",
    "Order 12345678 shipped; tracking 4111111111111112 (not a card: fails Luhn).",
    "Version 1.2.3 of the API, port 8080, build 20240501.",
    "IBAN-looking GB00 WEST 1234 5698 7654 32 has a wrong check digit.",
    "Call the function get_weather(city='Paris') and reply in JSON.",
]


def _prompt() -> str:
    lines = []
    for kind, value in CORPUS:
        prefix = "aws_secret_access_key=" if value.startswith("wJal") else f"{kind.lower()}: "
        lines.append(prefix + value)
    return "Please check these:\n" + "\n".join(lines)


@pytest.mark.parametrize("kind, value", CORPUS)
def test_each_kind_is_found_and_typed(kind: str, value: str) -> None:
    text = ("aws_secret_access_key=" if value.startswith("wJal") else "value ") + value + " end"
    findings = find_sensitive(text)
    assert [text[f.start:f.end] for f in findings] == [value]
    assert findings[0].kind == kind and kind in KINDS
    out = redact(text)
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    assert value not in out and f"[{kind} len={len(value)} h={digest}]" in out


@pytest.mark.parametrize("text", CLEAN)
def test_clean_text_has_no_findings(text: str) -> None:
    assert find_sensitive(text) == [] and redact(text) == text


def test_findings_are_sorted_and_disjoint() -> None:
    text = _prompt()
    findings = find_sensitive(text)
    assert len(findings) == len(CORPUS)
    assert all(isinstance(f, Finding) for f in findings)
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))


def test_redact_body_walks_json_and_secret_named_fields() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "mail a@b.example.org"}]}],
            "metadata": {"api_key": "plain-but-named-secret", "max_tokens": 5}}
    out = redact_body(body)
    assert out["messages"][0]["content"][0]["text"].startswith("mail [EMAIL len=15 h=")
    assert out["metadata"]["api_key"].startswith("[GENERIC_SECRET len=22 h=") and out["metadata"]["max_tokens"] == 5


def _values() -> list[bytes]:
    out = []
    for _, value in CORPUS:
        out.append(value.encode())
        compact = re.sub(r"[ -]", "", value)
        if compact != value and compact.isalnum():
            out.append(compact.encode())
    out.append(PEM_BODY.encode())
    return out


def _body_logging(config: dict[str, Any], upstream: UpstreamProcess) -> dict[str, Any]:
    config["audit"] = {"log_bodies": True, "retention_days": 30}
    config["providers"].append({"name": "anthro", "type": "anthropic", "base_url": upstream.url,
                                "api_key_env": "TEST_UPSTREAM_KEY", "locality": "local", "timeout_s": 10})
    config["models"].append({"name": "claude-local", "provider": "anthro", "upstream_model": "claude-mock",
                             "input_usd_per_mtok": 3, "output_usd_per_mtok": 15, "max_output_tokens": 512,
                             "data_boundary": "local", "capabilities": ["chat"]})
    return config


@pytest.fixture
def body_logging_gateway(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
                         upstream: UpstreamProcess) -> RunningGateway:
    _body_logging(gw_config, upstream)
    return start_gateway()


def _send_corpus(v1: str, base: str, upstream: UpstreamProcess) -> int:
    """The corpus through both SDKs, streamed and not, echoed back by the model; then a stream the
    upstream cuts (the gateway logs a warning for that request). Returns the requests sent."""
    prompt = _prompt()
    oc = openai.OpenAI(base_url=v1, api_key=TENANT_KEY, max_retries=0)
    ac = anthropic.Anthropic(base_url=base, api_key=TENANT_KEY, max_retries=0)
    echo = {"text": "Noted: " + prompt}  # the model repeats everything back: completions are scanned too
    upstream.script(echo, echo, echo, echo, echo, {**echo, "cut_after_chunks": 2})
    oc.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": prompt}])
    list(oc.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": prompt}], stream=True))
    ac.messages.create(model="mock-a", max_tokens=200, system=prompt, messages=[{"role": "user", "content": prompt}])
    with ac.messages.stream(model="claude-local", max_tokens=200, messages=[{"role": "user", "content": prompt}]) as s:
        "".join(s.text_stream)
    ac.messages.create(model="claude-local", max_tokens=200, messages=[{"role": "user", "content": prompt}])
    with httpx.stream("POST", f"{v1}/chat/completions", timeout=10, headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": "mock-a", "stream": True, "messages": [{"role": "user", "content": prompt}]}) as r:
        r.read()
    return 6


def _assert_nowhere(texts: dict[str, bytes]) -> None:
    for value in _values():
        for where, text in texts.items():
            assert value not in text, f"{value[:12]!r} found in {where}"
    for where, text in texts.items():
        assert TENANT_KEY.encode() not in text, f"the tenant key found in {where}"


def test_corpus_through_both_sdks_never_lands_in_files_or_logs(
    body_logging_gateway: RunningGateway, upstream: UpstreamProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = body_logging_gateway
    sent = _send_corpus(gw.v1, gw.url, upstream)
    records = wait_for(lambda: len(read_audit(gw.runtime.db_path)) == sent and read_audit(gw.runtime.db_path))
    assert {r["api"] for r in records} == {"openai", "anthropic"}
    for record in records[:5]:
        assert record["status"] == 200 and record["request_body"] and record["response_text"].startswith("Noted: ")
        stored = str(record["request_body"]) + record["response_text"]
        for kind, value in CORPUS:
            assert f"[{kind} len={len(value)} h={hashlib.sha256(value.encode()).hexdigest()[:8]}]" in stored
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"state.db", "audit.jsonl"}
    formatter = JsonFormatter()
    # The gateway's log lines (the test's own SDK clients log their requests at DEBUG).
    clients = ("openai", "anthropic", "httpx", "httpcore")
    log_lines = [formatter.format(r) for r in caplog.records if not r.name.startswith(clients)]
    assert any(r.name == "gateway.request" and r.getMessage() == "upstream stream failed" for r in caplog.records)
    _assert_nowhere({**{str(p): p.read_bytes() for p in written}, **{f"log line {i}": line.encode()
                                                                   for i, line in enumerate(log_lines)}})


def test_corpus_never_lands_in_a_serve_process_output_or_files(
        gw_config: dict[str, Any], upstream: UpstreamProcess, tmp_path: Path) -> None:
    """The same through a real `gateway serve` (DEBUG, JSON logs): its stdout/stderr and state files."""
    home = tmp_path / "serve"
    home.mkdir()
    config = _body_logging(copy.deepcopy(gw_config), upstream)
    config["state"] = {"database_url": f"sqlite:///{home / 'state.db'}"}
    node = GatewayProcess(write_config(home, config), tmp_path / "serve.log",
                          env={"GATEWAY_LOG_LEVEL": "DEBUG", "GATEWAY_LOG_JSON": "true"})
    try:
        sent = _send_corpus(node.v1, node.url, upstream)
        wait_for(lambda: len(read_audit(home / "state.db")) == sent)
    finally:
        assert node.stop() == 0
    output = node.log_path.read_bytes()
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    assert any(line["msg"].startswith("gateway listening") or line["logger"].startswith("gateway") for line in lines)
    warned = [line for line in lines if line["msg"] == "upstream stream failed"]
    assert len(warned) == 1 and warned[0]["request_id"].startswith("req")  # a log line of a corpus request
    written = [p for p in home.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"state.db", "audit.jsonl"}
    _assert_nowhere({"the serve process output": output, **{str(p): p.read_bytes() for p in written}})


def test_bodies_are_not_stored_by_default(gateway: RunningGateway) -> None:
    oc = openai.OpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    oc.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "jane@example.com says hi"}])
    record = wait_for(lambda: read_audit(gateway.runtime.db_path))[0]
    assert record["request_body"] is None and record["response_text"] is None
    assert b"jane@example.com" not in gateway.runtime.audit.jsonl_path.read_bytes()
