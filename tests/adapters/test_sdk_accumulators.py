"""Translated golden streams, fed to each SDK's own stream accumulator, give the same
message as the translated non-streamed answer would: nothing the SDK ignores or rejects."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

GOLDEN = Path(__file__).parent / "golden"
_EVENT = TypeAdapter(RawMessageStreamEvent)


def _goldens(direction: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((GOLDEN / direction).glob("*.json")):
        golden = json.loads(path.read_text())
        if golden.get("stream_out") and golden.get("stream_done"):
            found.append((path.stem, golden))
    return found


@pytest.mark.parametrize(("case", "golden"), _goldens("anthropic_client__openai_upstream"))
def test_anthropic_sdk_accumulates_streams_from_openai_upstreams(case: str, golden: dict[str, Any]) -> None:
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    names = []
    for frame in golden["stream_out"]:
        name, data = frame.split("\n", 1)
        names.append(name[len("event: "):])
        snapshot = accumulate_event(event=_EVENT.validate_python(orjson.loads(data[len("data: "):])),
                                    current_snapshot=snapshot, json_bufs=json_bufs)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert snapshot.stop_reason in ("end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal")
    assert snapshot.usage.output_tokens > 0
    text = "".join(b.text for b in snapshot.content if b.type == "text")
    tools = [(b.name, b.input) for b in snapshot.content if b.type == "tool_use"]
    if case == "tools_streamed":
        assert tools == [("get_weather", {"city": "Paris"}),
                         ("mcp__acme_internal_knowledge_base__search_documents_by_semantic_similarity", {"q": "rain"})]
        assert snapshot.stop_reason == "tool_use"
    else:
        assert text and not tools


@pytest.mark.parametrize(("case", "golden"), _goldens("openai_client__anthropic_upstream"))
def test_openai_sdk_accumulates_streams_from_anthropic_upstreams(case: str, golden: dict[str, Any]) -> None:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(input_tools=golden["request_in"].get("tools") or [])
    frames = golden["stream_out"]
    assert frames[-1] == "data: [DONE]"
    for frame in frames[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(orjson.loads(frame[len("data: "):])))
    raises = {"max_tokens": openai.LengthFinishReasonError, "refusal": openai.ContentFilterFinishReasonError}
    if case in raises:  # the SDK's own behaviour for these finish reasons, as against OpenAI itself
        with pytest.raises(raises[case]) as info:
            state.get_final_completion()
        final: Any = info.value.completion
    else:
        final = state.get_final_completion()
    choice = final.choices[0]
    if case == "tools_streamed":
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Asia/Tokyo"})]
        assert [c.id for c in choice.message.tool_calls or []] == ["toolu_01P", "toolu_01T"]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    else:
        assert choice.message.content and not choice.message.tool_calls
    expected_usage = golden["request_in"].get("stream_options", {}).get("include_usage", False)
    assert (final.usage is not None) == expected_usage
