"""OpenAI chat streams <-> canonical stream events.

`OpenAIStreamParser` turns an upstream's chunks into content blocks (a text block, one
block per tool call) and holds the finish reason until the usage chunk and `[DONE]`.
`OpenAIStreamRenderer` writes canonical events as chunks an OpenAI client accumulates:
role first, tool-call id/type/name only in the first fragment of each call, a finish
chunk, the usage chunk when asked for, then `data: [DONE]`.
"""
from __future__ import annotations

from typing import Any

import orjson

from adapters import naming
from adapters.base import Usage
from adapters.canonical import (
    ArgsDelta,
    BlockStart,
    BlockStop,
    Event,
    MessageDelta,
    MessageStart,
    MessageStop,
    StopReason,
    StreamError,
    TextDelta,
    as_object,
)
from adapters.openai import usage_from_payload
from adapters.translate_openai import (
    FINISH_FROM_OPENAI,
    FINISH_TO_OPENAI,
    usage_to_openai,
)

DONE = b"data: [DONE]\n\n"


class OpenAIStreamParser:
    def __init__(self) -> None:
        self._started = False
        self._ended = False
        self._id = ""
        self._open: int | None = None  # index of the open block
        self._open_is_text = False
        self._next = 0
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> block index
        self._finish: StopReason | None = None
        self._usage: Usage | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Events for one `data:` payload of the upstream stream."""
        if data == b"[DONE]":
            return self.finish()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return [StreamError("api_error")]
        if not isinstance(obj, dict):
            return []
        if "error" in obj:
            return [StreamError("api_error")]
        out: list[Event] = []
        if not self._started:
            self._started = True
            self._id = str(obj.get("id") or "")
            out.append(MessageStart(self._id, str(obj.get("model") or "")))
        usage = usage_from_payload(obj)
        if usage is not None:
            self._usage = usage
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is not None:
            self._choice(choice, out)
        return out

    def _choice(self, choice: dict[str, Any], out: list[Event]) -> None:
        delta = as_object(choice.get("delta"))
        refusal = delta.get("refusal")
        text = (delta.get("content") or "") + (refusal or "")
        if text:
            if self._open is None or not self._open_is_text:
                self._start(out, "text")
            out.append(TextDelta(self._open, text))  # type: ignore[arg-type]
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool(call, out)
        finish = choice.get("finish_reason")
        if refusal:
            self._finish = "content_filter"
        elif finish and self._finish != "content_filter":
            self._finish = FINISH_FROM_OPENAI.get(str(finish), "end")

    def _tool(self, call: dict[str, Any], out: list[Event]) -> None:
        index = call.get("index")
        key = index if isinstance(index, int) else len(self._tools)
        fn = as_object(call.get("function"))
        if key not in self._tools:
            call_id = str(call.get("id") or f"call_{self._id}_{key}")
            self._tools[key] = self._start(out, "tool_call", call_id, str(fn.get("name") or ""))
        args = fn.get("arguments")
        if args:
            # Some servers interleave parallel calls; such fragments still go to their own block.
            out.append(ArgsDelta(self._tools[key], str(args)))

    def _start(self, out: list[Event], kind: str, call_id: str = "", name: str = "") -> int:
        if self._open is not None:
            out.append(BlockStop(self._open))
        index, self._next = self._next, self._next + 1
        self._open, self._open_is_text = index, kind == "text"
        out.append(BlockStart(index, "text" if kind == "text" else "tool_call", call_id, name))
        return index

    def finish(self) -> list[Event]:
        """Close the message: on `[DONE]`, or when the upstream ends after a finish reason."""
        if self._ended or not self._started:
            return []
        self._ended = True
        out: list[Event] = []
        if self._open is not None:
            out.append(BlockStop(self._open))
            self._open = None
        out.append(MessageDelta(self._finish or "end", None, self._usage))
        out.append(MessageStop())
        return out

    def end(self) -> list[Event]:
        """When the upstream ends without `[DONE]`: finished if a finish reason came, else not."""
        return self.finish() if self._finish is not None else []


class OpenAIStreamRenderer:
    def __init__(self, *, client_wants_usage: bool, names: dict[str, str], created: int) -> None:
        self._wants_usage = client_wants_usage
        self._names = names
        self._created = created
        self._ordinals: dict[int, int] = {}  # block index -> tool-call index
        self._head = self._head_for("", "")
        self._tail = b',"usage":null}\n\n' if client_wants_usage else b"}\n\n"

    def _head_for(self, answer_id: str, model: str) -> bytes:
        return (b'data: {"id":' + orjson.dumps(answer_id) + b',"object":"chat.completion.chunk","created":'
                + str(self._created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":')

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head + orjson.dumps([choice]) + self._tail

    def render(self, event: Event) -> bytes:
        if isinstance(event, TextDelta):
            return self._chunk({"content": event.text})
        if isinstance(event, ArgsDelta):
            ordinal = self._ordinals.get(event.index)
            if ordinal is None:
                return b""
            return self._chunk({"tool_calls": [{"index": ordinal, "function": {"arguments": event.json}}]})
        if isinstance(event, BlockStart):
            if event.kind != "tool_call":
                return b""
            ordinal = self._ordinals[event.index] = len(self._ordinals)
            name = naming.to_client_name(event.name, self._names)
            return self._chunk({"tool_calls": [{"index": ordinal, "id": event.id, "type": "function",
                                                "function": {"name": name, "arguments": ""}}]})
        if isinstance(event, MessageStart):
            self._head = self._head_for(event.id, event.model)
            return self._chunk({"role": "assistant", "content": ""})
        if isinstance(event, MessageDelta):
            out = self._chunk({}, FINISH_TO_OPENAI[event.stop_reason])
            if self._wants_usage and event.usage is not None:
                out += self._head + b'[],"usage":' + orjson.dumps(usage_to_openai(event.usage)) + b"}\n\n"
            return out
        if isinstance(event, MessageStop):
            return DONE
        if isinstance(event, StreamError):
            return error_chunk(event.kind)
        return b""  # BlockStop: nothing to say in this format


def error_chunk(kind: str) -> bytes:
    """A mid-stream error as OpenAI clients read it (fixed text: never the upstream's)."""
    return b'data: {"error":{"message":"the upstream stream failed","type":' + orjson.dumps(kind) + \
        b',"code":"upstream_error"}}\n\n'
