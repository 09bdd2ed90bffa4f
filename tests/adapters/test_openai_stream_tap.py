"""The OpenAI stream tap: usage capture/stripping, tool-call fragments, counted usage."""
from __future__ import annotations

import orjson
import pytest

from adapters.openai import ChatStreamTap


def frame(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    return frame({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def events(out: bytes) -> list[object]:
    found: list[object] = []
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event[6:]
            found.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return found


def run(tap: ChatStreamTap, frames: list[bytes], split: int = 0) -> list[object]:
    raw = b"".join(frames)
    pieces = [raw] if not split else [raw[i:i + split] for i in range(0, len(raw), split)]
    out = b"".join(tap.feed(p) for p in pieces) + tap.flush()
    return events(out)


USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
         "prompt_tokens_details": {"cached_tokens": 4}}


@pytest.mark.parametrize("split", [0, 1, 7])
@pytest.mark.parametrize("wants_usage", [True, False])
def test_usage_chunk_kept_or_stripped(split: int, wants_usage: bool) -> None:
    tap = ChatStreamTap(client_wants_usage=wants_usage)
    got = run(tap, [chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop"),
                    frame({"id": "c1", "choices": [], "usage": USAGE}), b"data: [DONE]\n\n"], split)
    assert tap.usage is not None
    assert (tap.usage.input_tokens, tap.usage.cached_input_tokens, tap.usage.output_tokens) == (6, 4, 3)
    assert tap.done and tap.content_started and tap.text_parts == ["hi"]
    usage_frames = [e for e in got if isinstance(e, dict) and e.get("usage")]
    assert len(usage_frames) == (1 if wants_usage else 0)
    assert got[-1] == "[DONE]"


def test_repeated_tool_call_ids_and_names_are_kept_on_the_first_fragment_only() -> None:
    def call(args: str) -> dict[str, object]:
        return {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": args}}]}

    tap = ChatStreamTap(client_wants_usage=False)
    got = run(tap, [chunk(call('{"ci')), chunk(call('ty": "Paris"}')), chunk({}, "tool_calls"), b"data: [DONE]\n\n"])
    first, second = (e["choices"][0]["delta"]["tool_calls"][0] for e in got[:2])  # type: ignore[index]
    assert first == {"index": 0, "id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"ci'}}
    assert second == {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}


def test_well_formed_tool_fragments_pass_through_byte_for_byte() -> None:
    frames = [chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function",
                                     "function": {"name": "g", "arguments": "{}"}}]})]
    tap = ChatStreamTap(client_wants_usage=False)
    assert b"".join(tap.feed(f) for f in frames) == b"".join(frames)


def test_counted_usage_chunk_when_upstream_sends_none_and_client_asked() -> None:
    tap = ChatStreamTap(client_wants_usage=True, input_estimate=21, count_text=lambda text: len(text.split()))
    got = run(tap, [chunk({"role": "assistant", "content": "one two"}), chunk({"content": " three"}, "stop"),
                    b"data: [DONE]\n\n"])
    usage_chunk = got[-2]
    assert got[-1] == "[DONE]"
    assert usage_chunk == {"id": "c1", "created": 7, "model": "m", "object": "chat.completion.chunk",
                           "choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}}
    assert tap.usage is not None and tap.usage.estimated and tap.usage.output_tokens == 3


def test_no_counted_usage_chunk_when_client_did_not_ask() -> None:
    tap = ChatStreamTap(client_wants_usage=False, input_estimate=21, count_text=len)
    got = run(tap, [chunk({"content": "x"}, "stop"), b"data: [DONE]\n\n"])
    assert [e for e in got if isinstance(e, dict) and "usage" in e] == []
    assert tap.usage is None
