"""Issue 6: an upstream 4xx that is the caller's fault is returned as it is: its status, and its
error code when it is a known provider code, so an SDK can branch on it. Never the upstream's
message (it may echo the prompt): each known code has a fixed gateway message."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from gateway.upstream_errors import KNOWN_CODES
from tests.gateway.faultkit import (
    HI,
    ac,
    add_models,
    audit_rows,
    oa_error,
    oc,
    policy,
    route,
    wait_for,
)
from tests.harness import RunningGateway, UpstreamProcess

ECHO = "the prompt 'my secret plan for q3' was"


@pytest.fixture
def gw(gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway], upstream: UpstreamProcess) -> RunningGateway:
    add_models(gw_config, upstream.url)
    return start_gateway(policies=policy(route("ab", ["mock-a", "mock-b"]), route("ctx-same", ["mock-a", "mock-b"]),
                                         route("claude", ["claude-a"])))


@pytest.mark.parametrize(("status", "code", "error_type", "sdk_error"), [
    (400, "content_filter", "invalid_request_error", openai.BadRequestError),
    (400, "unsupported_parameter", "invalid_request_error", openai.BadRequestError),
    (400, "invalid_value", "invalid_request_error", openai.BadRequestError),
    (422, "unsupported_value", "invalid_request_error", openai.UnprocessableEntityError),
])
def test_a_known_upstream_code_reaches_the_sdk_without_the_upstream_text(
        gw: RunningGateway, upstream: UpstreamProcess, status: int, code: str, error_type: str,
        sdk_error: type[openai.APIStatusError]) -> None:
    upstream.script(oa_error(status, code, f"{ECHO} refused"))
    with pytest.raises(sdk_error) as info:
        oc(gw, max_retries=2).chat.completions.create(model="ab", messages=HI)
    err = info.value
    assert err.status_code == status and err.code == code and err.type == error_type
    assert "secret plan" not in err.response.text
    assert err.body["message"] == KNOWN_CODES[code].message  # type: ignore[index]
    assert err.response.headers["x-should-retry"] == "false"
    assert len(upstream.attempts()) == 1  # never retried, never on a laxer model
    assert wait_for(lambda: audit_rows(gw))[0]["error_code"] == code


def test_context_length_keeps_its_openai_code(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(oa_error(400, "context_length_exceeded", f"{ECHO} 9100 tokens, too long"))
    with pytest.raises(openai.BadRequestError) as info:
        oc(gw).chat.completions.create(model="ctx-same", messages=HI)  # mock-b's window is no larger
    err = info.value
    assert err.code == "context_length_exceeded" and err.type == "invalid_request_error"
    assert "9100" not in err.response.text and "secret plan" not in err.response.text


def test_an_unknown_upstream_code_is_not_passed_on(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script(oa_error(400, "my_secret_plan_code", f"{ECHO} refused"))
    with pytest.raises(openai.BadRequestError) as info:
        oc(gw).chat.completions.create(model="ab", messages=HI)
    err = info.value
    assert err.code == "invalid_request" and "secret" not in err.response.text


def test_anthropic_client_gets_the_fixed_message(gw: RunningGateway, upstream: UpstreamProcess) -> None:
    upstream.script({"status": 400, "body": {"type": "error", "error": {
        "type": "invalid_request_error", "message": f"{ECHO} not accepted"}}})
    with pytest.raises(anthropic.BadRequestError) as info:
        ac(gw).messages.create(model="claude", max_tokens=20, messages=HI)
    err = info.value
    assert err.status_code == 400 and "secret plan" not in err.response.text
    assert err.body["error"] == {"type": "invalid_request_error",  # type: ignore[index]
                                 "message": KNOWN_CODES["invalid_request_error"].message}
