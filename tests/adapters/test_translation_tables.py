"""Table tests for every mapping between the OpenAI and Anthropic formats (both directions)."""
from __future__ import annotations

from decimal import Decimal
from typing import Any, get_args

import pytest

from adapters import naming
from adapters.anthropic import usage_from_anthropic
from adapters.base import Usage
from adapters.canonical import StopReason, TranslationError
from adapters.openai import usage_from_payload
from adapters.translate_anthropic import (
    STOP_FROM_ANTHROPIC,
    STOP_TO_ANTHROPIC,
    request_from_anthropic,
    request_to_anthropic,
    response_from_anthropic,
    usage_to_anthropic,
)
from adapters.translate_openai import (
    FINISH_FROM_OPENAI,
    FINISH_TO_OPENAI,
    request_from_openai,
    request_to_openai,
    response_from_openai,
    usage_to_openai,
)


def to_anthropic(body: dict[str, Any], max_tokens: int = 1024) -> dict[str, Any]:
    """An OpenAI client's body as an Anthropic provider gets it."""
    return request_to_anthropic(request_from_openai(body), max_tokens=max_tokens)


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic client's body as an OpenAI provider gets it."""
    return request_to_openai(request_from_anthropic(body), max_tokens_key="max_completion_tokens",
                             max_tokens=body.get("max_tokens"))


def oa(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


def an(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": list(messages), **extra}


# ------------------------------------------------------------------ stop / finish reasons
@pytest.mark.parametrize(("anthropic_stop", "openai_finish"), [
    ("end_turn", "stop"),
    ("stop_sequence", "stop"),
    ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"),
    ("tool_use", "tool_calls"),
    ("refusal", "content_filter"),
    ("pause_turn", "stop"),
])
def test_anthropic_stop_reason_as_openai_finish_reason(anthropic_stop: str, openai_finish: str) -> None:
    assert FINISH_TO_OPENAI[STOP_FROM_ANTHROPIC[anthropic_stop]] == openai_finish


@pytest.mark.parametrize(("openai_finish", "anthropic_stop"), [
    ("stop", "end_turn"),
    ("length", "max_tokens"),
    ("tool_calls", "tool_use"),
    ("function_call", "tool_use"),
    ("content_filter", "refusal"),
])
def test_openai_finish_reason_as_anthropic_stop_reason(openai_finish: str, anthropic_stop: str) -> None:
    assert STOP_TO_ANTHROPIC[FINISH_FROM_OPENAI[openai_finish]] == anthropic_stop


def test_every_canonical_stop_reason_renders_in_both_formats() -> None:
    assert set(STOP_TO_ANTHROPIC) == set(FINISH_TO_OPENAI) == set(get_args(StopReason))


# ------------------------------------------------------------------ roles, system hoisting, merging
def test_openai_system_and_developer_messages_are_hoisted() -> None:
    body = to_anthropic(oa({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]}))
    assert body["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No emoji."}]
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_single_system_prompt_is_a_string_for_anthropic() -> None:
    assert to_anthropic(oa({"role": "system", "content": "S"}, {"role": "user", "content": "u"}))["system"] == "S"


@pytest.mark.parametrize(("system", "expected"), [
    ("You are terse.", [{"role": "system", "content": "You are terse."}]),
    ([{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
     [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}]),
])
def test_anthropic_system_becomes_leading_system_messages(system: Any, expected: list[dict[str, Any]]) -> None:
    messages = to_openai(an({"role": "user", "content": "hi"}, system=system))["messages"]
    assert messages[: len(expected)] == expected and messages[-1] == {"role": "user", "content": "hi"}


def test_consecutive_same_role_turns_are_merged_for_anthropic() -> None:
    body = to_anthropic(oa({"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}, {"role": "assistant", "content": ""},
                           {"role": "user", "content": "d"}))
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]


def test_tool_messages_merge_into_one_user_turn_with_results_first() -> None:
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": f'{{"i":{i}}}'}}
             for i in (1, 2)]
    body = to_anthropic(oa({"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": "call_1", "content": "one"},
                           {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
                           {"role": "user", "content": "thanks"}))
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"i": 1}},
        {"type": "tool_use", "id": "call_2", "name": "f", "input": {"i": 2}}]}
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "two"},
        {"type": "text", "text": "thanks"}]}


def test_anthropic_tool_results_become_tool_messages_before_the_user_text() -> None:
    messages = to_openai(an(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "Calling."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "text", "text": "and?"},
                                     {"type": "tool_result", "tool_use_id": "toolu_1", "content": "bad", "is_error": True}]},
    ))["messages"]
    assert messages[1] == {"role": "assistant", "content": "Calling.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}
    assert messages[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "[tool error] bad"},
                            {"role": "user", "content": "and?"}]


# ------------------------------------------------------------------ tool definitions and tool_choice
def test_tool_definitions_both_ways() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    openai_tool = {"type": "function", "function": {"name": "weather", "description": "d", "parameters": schema}}
    anthropic_tool = {"name": "weather", "description": "d", "input_schema": schema}
    assert to_anthropic(oa({"role": "user", "content": "x"}, tools=[openai_tool]))["tools"] == [anthropic_tool]
    assert to_openai(an({"role": "user", "content": "x"}, tools=[anthropic_tool]))["tools"] == [openai_tool]


@pytest.mark.parametrize(("openai_choice", "parallel", "anthropic_choice"), [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_tool_choice_openai_to_anthropic(openai_choice: Any, parallel: bool | None, anthropic_choice: Any) -> None:
    extra: dict[str, Any] = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    if openai_choice is not None:
        extra["tool_choice"] = openai_choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    assert to_anthropic(oa({"role": "user", "content": "x"}, **extra)).get("tool_choice") == anthropic_choice


@pytest.mark.parametrize(("anthropic_choice", "openai_choice", "parallel"), [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}, None),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
])
def test_tool_choice_anthropic_to_openai(anthropic_choice: Any, openai_choice: Any, parallel: bool | None) -> None:
    body = to_openai(an({"role": "user", "content": "x"}, tools=[{"name": "f", "input_schema": {}}],
                        tool_choice=anthropic_choice))
    assert body["tool_choice"] == openai_choice and body.get("parallel_tool_calls") == parallel


# ------------------------------------------------------------------ tool ids and names
@pytest.mark.parametrize("call_id", ["call_abc123", "chatcmpl-tool-9f8e", "call:1/2", "toolu_gwX", "x y", "ü"])
def test_tool_ids_round_trip_and_are_valid_for_anthropic(call_id: str) -> None:
    wire = naming.anthropic_tool_id(call_id)
    assert naming.original_tool_id(wire) == call_id
    assert all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in wire)


def test_valid_tool_ids_are_left_alone() -> None:
    assert naming.anthropic_tool_id("call_abc") == "call_abc"
    assert naming.original_tool_id("toolu_01AbC") == "toolu_01AbC"


@pytest.mark.parametrize("name", ["x" * 65, "mcp__server__" + "y" * 90, "server.tool", "has space"])
def test_long_or_invalid_tool_names_are_shortened_reversibly(name: str) -> None:
    short = naming.short_name(name, 64)
    assert len(short) <= 64 and all(ch.isalnum() or ch in "_-" for ch in short)
    assert naming.to_client_name(short, naming.name_table([name, "ok_name"], "openai")) == name
    assert naming.short_name(name, 64) == short  # deterministic: history and tools agree


def test_shortened_names_stay_distinct() -> None:
    a, b = "p" * 70 + "_read", "p" * 70 + "_write"
    assert naming.short_name(a, 64) != naming.short_name(b, 64)
    assert naming.name_table(["short_ok"], "anthropic") == {}


def test_long_tool_name_is_shortened_everywhere_in_the_request() -> None:
    long_name = "n" * 80
    body = to_openai(an({"role": "user", "content": "x"},
                        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": long_name, "input": {}}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
                        tools=[{"name": long_name, "input_schema": {}}], tool_choice={"type": "tool", "name": long_name}))
    short = naming.short_name(long_name, 64)
    assert body["tools"][0]["function"]["name"] == short
    assert body["tool_choice"]["function"]["name"] == short
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == short


# ------------------------------------------------------------------ images
@pytest.mark.parametrize(("openai_part", "anthropic_block"), [
    ({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
     {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}),
    ({"type": "image_url", "image_url": {"url": "https://example.test/cat.png", "detail": "high"}},
     {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.png"}}),
])
def test_images_both_ways(openai_part: dict[str, Any], anthropic_block: dict[str, Any]) -> None:
    text = {"type": "text", "text": "what is this?"}
    anthropic_body = to_anthropic(oa({"role": "user", "content": [text, openai_part]}))
    assert anthropic_body["messages"][0]["content"] == [text, anthropic_block]
    openai_body = to_openai(an({"role": "user", "content": [text, anthropic_block]}))
    openai_part = {"type": "image_url", "image_url": {"url": openai_part["image_url"]["url"]}}
    assert openai_body["messages"][0]["content"] == [text, openai_part]


# ------------------------------------------------------------------ scalar parameters
def test_parameters_openai_to_anthropic() -> None:
    body = to_anthropic(oa({"role": "user", "content": "x"}, temperature=1.7, top_p=0.9, stop="END", user="u-1",
                           stream=True), max_tokens=99)
    assert body["temperature"] == 1.0  # Anthropic's range ends at 1
    assert (body["top_p"], body["stop_sequences"], body["metadata"], body["stream"], body["max_tokens"]) == (
        0.9, ["END"], {"user_id": "u-1"}, True, 99)


def test_parameters_anthropic_to_openai() -> None:
    body = to_openai(an({"role": "user", "content": "x"}, temperature=0.2, stop_sequences=["a", "b", "c", "d", "e"],
                        metadata={"user_id": "u-2"}, top_k=5))
    assert (body["temperature"], body["stop"], body["user"], body["max_completion_tokens"]) == (
        0.2, ["a", "b", "c", "d"], "u-2", 64)
    assert "top_k" not in body


def test_json_mode_becomes_a_system_instruction_for_anthropic() -> None:
    body = to_anthropic(oa({"role": "user", "content": "x"}, response_format={"type": "json_object"}))
    assert "JSON" in body["system"]


@pytest.mark.parametrize(("body", "message"), [
    (oa({"role": "user", "content": "x"}, n=2), "'n'"),
    (oa({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}), "input_audio"),
    (oa({"role": "user", "content": "x"}, tools=[{"type": "custom", "custom": {"name": "c"}}]), "function"),
])
def test_openai_requests_anthropic_cannot_express(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        to_anthropic(body)


@pytest.mark.parametrize(("body", "message"), [
    (an({"role": "user", "content": "x"}, tools=[{"type": "web_search_20250305", "name": "web_search"}]), "web_search"),
    (an({"role": "user", "content": [{"type": "document", "source": {}}]}), "document"),
])
def test_anthropic_requests_openai_cannot_express(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        to_openai(body)


HI = {"role": "user", "content": "x"}
FN = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize("body", [
    oa(HI, temperature="hot"), oa(HI, temperature=True), oa(HI, top_p=[1]),
    oa(HI, stop=5), oa(HI, stop=["ok", 7]),
    oa({"role": "user", "content": 5}), oa({"role": "system", "content": {"text": "x"}}, HI),
    oa({"role": "tool", "tool_call_id": "c", "content": 5}),
    oa({"role": "user", "content": [{"type": "text", "text": 5}]}),
    oa(HI, {"role": "assistant", "content": None, "tool_calls": 5}),
    oa(HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": 5, "arguments": "{}"}}]}),
    oa(HI, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 5}}]}),
    oa(HI, tools=[{"type": "function", "function": {"name": "f", "description": 5}}]),
    oa(HI, tools=[FN], tool_choice={"type": "function", "function": {"name": 5}}),
], ids=lambda body: str({k: v for k, v in body.items() if k != "model"})[:70])
def test_openai_bodies_of_the_wrong_shape_are_translation_errors(body: dict[str, Any]) -> None:
    with pytest.raises(TranslationError):  # never a TypeError or AttributeError (a 500)
        to_anthropic(body)


TOOL = {"name": "f", "input_schema": {"type": "object"}}


@pytest.mark.parametrize("body", [
    an(HI, tools=[TOOL], tool_choice={"type": "tool", "name": 5}),
    an(HI, tools=[TOOL], tool_choice={"type": "tool"}),
    an(HI, tools=[{**TOOL, "description": ["x"]}]),
    an(HI, temperature="hot"), an(HI, top_p={"p": 1}), an(HI, temperature=False),
    an(HI, metadata={"user_id": 5}),
    an({"role": "user", "content": [{"type": "text", "text": ["x"]}]}),
    an({"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                 "data": 5}}]}),
    an({"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": 5, "data": "x"}}]}),
    an({"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": None}}]}),
    an({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}),
    an({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [5]}]}),
], ids=lambda body: str({k: v for k, v in body.items() if k not in ("model", "max_tokens")})[:70])
def test_anthropic_bodies_of_the_wrong_shape_are_translation_errors(body: dict[str, Any]) -> None:
    with pytest.raises(TranslationError):
        to_openai(body)


def test_number_and_object_forms_that_are_valid_still_translate() -> None:
    body = to_anthropic(oa(HI, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}, temperature=0, top_p=1))
    assert body["temperature"] == 0 and body["top_p"] == 1
    assert body["messages"][1]["content"][0]["input"] == {"a": 1}  # object arguments are accepted as sent
    assert to_openai(an(HI, temperature=0.2, metadata={"user_id": "u"}))["user"] == "u"


@pytest.mark.parametrize("payload", [
    {"type": "message", "content": 5}, {"type": "message", "content": "text"}, [1], "message", None,
])
def test_malformed_anthropic_answers_are_translation_errors(payload: Any) -> None:
    with pytest.raises(TranslationError):
        response_from_anthropic(payload)


@pytest.mark.parametrize("payload", [
    {"choices": [{"message": {"content": "hi", "tool_calls": 5}}]}, {"choices": [{"message": 5}]},
    {"choices": 5}, {"choices": []}, {"choices": [7]}, [1],
])
def test_malformed_openai_answers_are_translation_errors(payload: Any) -> None:
    with pytest.raises(TranslationError):
        response_from_openai(payload)


# ------------------------------------------------------------------ usage normalisation
@pytest.mark.parametrize(("raw", "normalised"), [
    ({"input_tokens": 100, "output_tokens": 7}, (100, 7, 0, 0)),
    ({"input_tokens": 100, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 50, "output_tokens": 7},
     (120, 7, 50, 20)),
])
def test_anthropic_usage_is_normalised(raw: dict[str, int], normalised: tuple[int, int, int, int]) -> None:
    usage = usage_from_anthropic(raw)
    assert usage is not None and usage.raw == raw
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_tokens) == normalised
    assert usage_to_anthropic(usage) == {"input_tokens": raw["input_tokens"], "output_tokens": raw["output_tokens"],
                                         "cache_creation_input_tokens": raw.get("cache_creation_input_tokens", 0),
                                         "cache_read_input_tokens": raw.get("cache_read_input_tokens", 0)}


def test_openai_usage_includes_cached_in_prompt_tokens_and_anthropic_excludes_it() -> None:
    raw = {"prompt_tokens": 170, "completion_tokens": 7, "total_tokens": 177, "prompt_tokens_details": {"cached_tokens": 50}}
    usage = usage_from_payload({"usage": raw})
    assert usage is not None and (usage.input_tokens, usage.cached_input_tokens) == (120, 50)
    assert usage_to_openai(usage)["prompt_tokens"] == 170
    assert usage_to_anthropic(usage)["input_tokens"] == 120
    anthropic_usage = Usage(input_tokens=120, output_tokens=7, cached_input_tokens=50, cache_write_tokens=20)
    assert usage_to_openai(anthropic_usage) == {"prompt_tokens": 170, "completion_tokens": 7, "total_tokens": 177,
                                                "prompt_tokens_details": {"cached_tokens": 50}}


def test_cache_reads_and_writes_are_priced_at_their_own_rates() -> None:
    from budgets import Price
    from gateway.relay import usage_cost

    price = Price(Decimal(3), Decimal(15), Decimal("0.3"), Decimal("3.75"))
    usage = Usage(input_tokens=1_000_020, output_tokens=1_000_000, cached_input_tokens=1_000_000,
                  cache_write_tokens=1_000_000)
    # 20 fresh input at $3/M, 1M output at $15, 1M cache reads at $0.30, 1M cache writes at $3.75
    assert usage_cost(price, usage) == Decimal("0.00006") + Decimal(15) + Decimal("0.3") + Decimal("3.75")
    unpriced = Price(Decimal(3), Decimal(15))
    assert usage_cost(unpriced, usage) == Decimal("0.00006") + Decimal(15) + Decimal(3) + Decimal(3)
