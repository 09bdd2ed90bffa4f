"""Anthropic message streams <-> canonical stream events.

`AnthropicStreamParser` reads an upstream's events (usage from message_start plus the
cumulative message_delta usage; thinking and server-tool blocks are skipped).
`AnthropicStreamRenderer` writes canonical events as an Anthropic client expects them:
an `event:` line on every frame, in the order message_start, per block
content_block_start / content_block_delta... / content_block_stop, message_delta (stop
reason, cumulative usage), message_stop.
"""
from __future__ import annotations

from typing import Any

import orjson

from adapters import naming
from adapters.anthropic import ERROR_TYPES, merge_usage, usage_from_anthropic
from adapters.base import Usage
from adapters.canonical import (
    ArgsDelta,
    BlockStart,
    BlockStop,
    Event,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamError,
    TextDelta,
    as_object,
)
from adapters.translate_anthropic import (
    STOP_FROM_ANTHROPIC,
    STOP_TO_ANTHROPIC,
    usage_to_anthropic,
)


class AnthropicStreamParser:
    def __init__(self) -> None:
        self._raw_usage: dict[str, Any] = {}
        self._skipped: set[int] = set()

    def feed(self, data: bytes) -> list[Event]:
        """Events for one upstream event's `data:` payload (its `type` names the event)."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return [StreamError("api_error")]
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._block_start(obj)
        if kind == "content_block_stop":
            index = obj.get("index")
            return [] if index in self._skipped or not isinstance(index, int) else [BlockStop(index)]
        if kind == "message_start":
            message = as_object(obj.get("message"))
            merge_usage(self._raw_usage, message.get("usage"))
            return [MessageStart(str(message.get("id") or ""), str(message.get("model") or ""), self._usage())]
        if kind == "message_delta":
            delta = as_object(obj.get("delta"))
            merge_usage(self._raw_usage, obj.get("usage"))
            stop = STOP_FROM_ANTHROPIC.get(str(delta.get("stop_reason")), "end")
            sequence = delta.get("stop_sequence") if isinstance(delta.get("stop_sequence"), str) else None
            return [MessageDelta(stop, sequence, self._usage())]
        if kind == "message_stop":
            return [MessageStop()]
        if kind == "error":
            error = as_object(obj.get("error"))
            return [StreamError(error["type"] if error.get("type") in ERROR_TYPES else "api_error")]
        return []  # ping and event types added later

    def end(self) -> list[Event]:
        """Nothing to add when the upstream ends early: an unfinished message stays unfinished."""
        return []

    def _usage(self) -> Usage | None:
        return usage_from_anthropic(dict(self._raw_usage)) if self._raw_usage else None

    def _block_start(self, obj: dict[str, Any]) -> list[Event]:
        index, block = obj.get("index"), obj.get("content_block")
        if not isinstance(index, int) or not isinstance(block, dict):
            return []
        if block.get("type") == "text":
            text = block.get("text")
            return [BlockStart(index, "text"), *([TextDelta(index, text)] if isinstance(text, str) and text else [])]
        if block.get("type") == "tool_use":
            start: list[Event] = [BlockStart(index, "tool_call", str(block.get("id") or ""), str(block.get("name") or ""))]
            if isinstance(block.get("input"), dict) and block["input"]:
                start.append(ArgsDelta(index, orjson.dumps(block["input"]).decode()))
            return start
        self._skipped.add(index)
        return []

    def _delta(self, obj: dict[str, Any]) -> list[Event]:
        index, delta = obj.get("index"), obj.get("delta")
        if not isinstance(index, int) or index in self._skipped or not isinstance(delta, dict):
            return []
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [TextDelta(index, str(delta["text"]))]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            return [ArgsDelta(index, str(delta["partial_json"]))]
        return []


def frame(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_frame(kind: str) -> bytes:
    """A mid-stream error as Anthropic clients read it (fixed text: never the upstream's)."""
    return frame("error", {"type": "error", "error": {"type": kind, "message": "the upstream stream failed"}})


class AnthropicStreamRenderer:
    def __init__(self, *, names: dict[str, str], input_estimate: int) -> None:
        self._names = names
        self._input_estimate = input_estimate
        self._indices: dict[int, int] = {}  # source block index -> rendered index
        self._open: int | None = None
        self._delta_sent = False

    def render(self, event: Event) -> bytes:
        if isinstance(event, (TextDelta, ArgsDelta)):
            index = self._indices.get(event.index)
            if index is None:
                return b""
            delta = ({"type": "text_delta", "text": event.text} if isinstance(event, TextDelta)
                     else {"type": "input_json_delta", "partial_json": event.json})
            return frame("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        if isinstance(event, BlockStart):
            return self._block_start(event)
        if isinstance(event, BlockStop):
            return self._close() if self._indices.get(event.index) == self._open else b""
        if isinstance(event, MessageStart):
            usage = usage_to_anthropic(event.usage or Usage(input_tokens=self._input_estimate))
            return frame("message_start", {"type": "message_start", "message": {
                "id": event.id, "type": "message", "role": "assistant", "model": event.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage}})
        if isinstance(event, MessageDelta):
            self._delta_sent = True
            return self._close() + frame("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": STOP_TO_ANTHROPIC[event.stop_reason], "stop_sequence": event.stop_sequence},
                "usage": usage_to_anthropic(event.usage or Usage(input_tokens=self._input_estimate))})
        if isinstance(event, MessageStop):
            head = b"" if self._delta_sent else self.render(MessageDelta("end"))
            return head + frame("message_stop", {"type": "message_stop"})
        if isinstance(event, StreamError):
            return error_frame(event.kind)
        return b""

    def _block_start(self, event: BlockStart) -> bytes:
        out = self._close()
        index = self._indices[event.index] = len(self._indices)
        self._open = index
        if event.kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": naming.anthropic_tool_id(event.id),
                     "name": naming.to_client_name(event.name, self._names), "input": {}}
        return out + frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return frame("content_block_stop", {"type": "content_block_stop", "index": index})
