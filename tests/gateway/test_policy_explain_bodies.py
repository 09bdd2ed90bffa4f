"""`gateway explain --body` reads Anthropic Messages bodies as well as OpenAI ones (detected by
shape, or `--api`), and bad input to explain or `policy simulate` is one error line, exit 1."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway import tokens
from gateway.cli import main
from gateway.explain import body_api
from gateway.parsing_anthropic import estimate_messages_input
from tests.harness import write_config

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
POLICY = {"name": "default", "routes": [
    {"name": "pics", "when": {"model": "pics"}, "candidates": ["mock-b", "mock-a"], "objective": "ordered"},
    {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]}]}
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "pics", "max_tokens": 300, "system": "You review screenshots. " * 40,
    "tools": [{"name": "crop", "description": "Crop the image", "input_schema": {"type": "object"}}],
    "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "What is wrong here?"}]}]}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def config_path(gw_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret-test")  # else every provider counts as down
    gw_config["models"][1]["capabilities"] = ["chat", "tools", "json", "vision"]  # mock-b sees images, mock-a not
    return write_config(tmp_path, gw_config, [POLICY])


def explain_json(capsys: pytest.CaptureFixture[str], config: Path, body: dict[str, Any], *extra: str) -> dict[str, Any]:
    path = config.parent / "req.json"
    path.write_text(json.dumps(body))
    code, out, err = run_cli(capsys, "explain", "--config", str(config), "--tenant", "team", "--model", "pics",
                             "--body", str(path), "--json", *extra)
    assert err == "" or "Traceback" not in err
    result: dict[str, Any] = json.loads(out)
    assert code == (0 if result["outcome"] == "ok" else 1)
    return result


@pytest.mark.parametrize("extra", [(), ("--api", "anthropic")], ids=["detected", "explicit"])
def test_explain_reads_an_anthropic_messages_body(config_path: Path, capsys: pytest.CaptureFixture[str],
                                                  extra: tuple[str, ...]) -> None:
    result = explain_json(capsys, config_path, ANTHROPIC_BODY, *extra)
    # The system prompt, the image and the tool are counted; the image needs vision, max_tokens is the cap.
    assert result["estimated_input_tokens"] == tokens.upper_bound(estimate_messages_input(ANTHROPIC_BODY))
    assert result["estimated_input_tokens"] > tokens.IMAGE_TOKENS + 200
    assert result["max_output_tokens"] == 300
    assert result["chosen"] == "mock-b" and result["fallbacks"] == []
    assert result["rejected"] == [{"model": "mock-a", "reason": "lacks capability vision"}]


def test_anthropic_body_content_scan_in_system_and_tool_use(config_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    body = {**ANTHROPIC_BODY, "system": "Be brief.", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "crop", "input": {"key": AWS_KEY}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}]}]}
    result = explain_json(capsys, config_path, body)
    assert result["data_class"] == "confidential" and result["sensitive_findings"] == ["AWS_KEY"]
    assert result["outcome"] == "ok" and result["chosen"] == "mock-a"  # vendor mock-b refused for the class


def test_openai_bodies_are_still_read_as_openai(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = {"model": "pics", "max_tokens": 50, "messages": [{"role": "system", "content": "Be brief."}, {
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    result = explain_json(capsys, config_path, body)
    assert result["max_output_tokens"] == 50 and result["chosen"] == "mock-b"
    assert result["rejected"] == [{"model": "mock-a", "reason": "lacks capability vision"}]
    forced = explain_json(capsys, config_path, {**ANTHROPIC_BODY, "system": "x"}, "--api", "openai")
    assert forced["estimated_input_tokens"] < tokens.upper_bound(estimate_messages_input(ANTHROPIC_BODY))


@pytest.mark.parametrize(("body", "api"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "openai"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "openai"),
    ({"input": "embed me"}, "openai"),
    ({"system": "x", "messages": []}, "anthropic"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END"]}, "anthropic"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f", "input_schema": {}}]}, "anthropic"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "any"}}, "anthropic"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]},
     "anthropic"),
])
def test_body_format_is_detected_by_shape(body: dict[str, Any], api: str) -> None:
    assert body_api(body) == api


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot be read"),  # no such file
    ("{not json", "request body is not valid JSON"),
    ("[1, 2]", "request body must be a JSON object"),
    ("", "request body is empty"),
    (json.dumps({"system": "x", "messages": []}), "'messages' must be a non-empty array"),  # an invalid Messages body
    (json.dumps({"messages": 5}), "'messages' must be a non-empty array"),  # an invalid chat body
])
def test_explain_bad_body_is_one_error_line(config_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: str | None, message: str) -> None:
    path = config_path.parent / "bad.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli(capsys, "explain", "--config", str(config_path), "--tenant", "team", "--model", "pics",
                             "--body", str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: --body {path}: ") and message in err, err


@pytest.mark.parametrize(("flag", "value"), [("--since", "notadate"), ("--until", "2026-13-45")])
def test_simulate_bad_date_is_one_error_line(config_path: Path, capsys: pytest.CaptureFixture[str],
                                             flag: str, value: str) -> None:
    new = config_path.parent / "new.yaml"
    new.write_text("name: default\nroutes:\n  - name: direct\n    when: {model: '*'}\n    candidates: ['$requested']\n")
    code, out, err = run_cli(capsys, "policy", "simulate", "--config", str(config_path), "--policy", str(new),
                             flag, value)
    assert code == 1 and out == ""
    assert err == f"error: {flag}: {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 timestamp\n"
