"""What the edges accept for the fields the worst-case reservation is made of: output caps
(OpenAI `max_tokens` / `max_completion_tokens`, Anthropic `max_tokens`) and OpenAI `n`."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.parsing import MAX_CHOICES, MAX_OUTPUT_TOKENS, parse_chat
from gateway.parsing_anthropic import parse_messages

HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "messages": HI, **fields})


def message(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "messages": HI, **fields})


@pytest.mark.parametrize(("fields", "max_out", "choices"), [
    ({}, None, 1),
    ({"max_tokens": 16}, 16, 1),
    ({"max_completion_tokens": 16}, 16, 1),
    # both given: an openai_compatible server may honour either, so the larger bounds the answer
    ({"max_completion_tokens": 16, "max_tokens": 200}, 200, 1),
    ({"max_completion_tokens": 300, "max_tokens": 20}, 300, 1),
    ({"max_tokens": MAX_OUTPUT_TOKENS}, MAX_OUTPUT_TOKENS, 1),
    ({"n": 1}, None, 1),
    ({"n": 4, "max_tokens": 10}, 10, 4),
    ({"n": MAX_CHOICES}, None, MAX_CHOICES),
    ({"n": None}, None, 1),
])
def test_openai_output_bound_fields(fields: dict[str, Any], max_out: int | None, choices: int) -> None:
    parsed = parse_chat(chat(**fields))
    assert (parsed.max_output_tokens, parsed.choices) == (max_out, choices)


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": 10**19}, "max_tokens"),  # once a 500 from PostgreSQL (numeric vs bigint)
    ({"max_tokens": MAX_OUTPUT_TOKENS + 1}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 1e19}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 10**19}, "max_completion_tokens"),
    ({"max_completion_tokens": 16, "max_tokens": 2**40}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": -1}, "n"),
    ({"n": 2.0}, "n"),
    ({"n": "2"}, "n"),
    ({"n": True}, "n"),
    ({"n": MAX_CHOICES + 1}, "n"),
    ({"n": 10**19}, "n"),
])
def test_openai_rejects_unbounded_or_malformed_output_fields(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(chat(**fields))
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_request", param)


@pytest.mark.parametrize("max_tokens", [10**19, MAX_OUTPUT_TOKENS + 1, 2**63, 1.5, "10", True, 0, -1])
def test_anthropic_rejects_unbounded_or_malformed_max_tokens(max_tokens: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_messages(message(max_tokens=max_tokens))
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_request", "max_tokens")


def test_anthropic_accepts_the_largest_allowed_max_tokens() -> None:
    parsed = parse_messages(message(max_tokens=MAX_OUTPUT_TOKENS))
    assert (parsed.max_output_tokens, parsed.choices) == (MAX_OUTPUT_TOKENS, 1)
