"""The one internal chat model: every edge parses into it and renders out of it.

OpenAI Chat and Anthropic Messages are translated through these types, so a new
provider format needs one translator (to and from canonical), not one per pair.
Same-format traffic never comes here: it is forwarded with only the model renamed.

Conventions: a conversation is alternating `user`/`assistant` messages (system text is
hoisted into `ChatRequest.system`); tool results are parts of a `user` message; tool
call arguments are kept as the JSON text the model produced; `Usage` is the normalised
one from `adapters.base` (input excludes cache reads, includes cache writes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from adapters.base import Usage

Role = Literal["user", "assistant"]
# end: natural end of turn; stop_sequence: a requested stop string; length: output cap;
# tool_use: the model wants tool results; content_filter: refused or filtered; pause: resumable.
StopReason = Literal["end", "stop_sequence", "length", "tool_use", "content_filter", "pause"]


def as_object(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (wire data is never trusted)."""
    return value if isinstance(value, dict) else {}


class TranslationError(ValueError):
    """The request cannot be expressed in the target format. The message is safe to show callers."""


def optional_number(body: dict[str, Any], key: str) -> float | None:
    """A sampling parameter (`temperature`, `top_p`): absent/null or a number, never a bool or a string."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TranslationError(f"'{key}' must be a number")
    return value


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    """Either inline base64 `data` with its `media_type`, or a `url`."""

    media_type: str | None = None
    data: str | None = None
    url: str | None = None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(slots=True)
class ToolResult:
    call_id: str
    content: list[Text | Image]
    is_error: bool = False


Part = Text | Image | ToolCall | ToolResult


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part]


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(slots=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None


@dataclass(slots=True)
class ChatRequest:
    messages: list[Message]
    system: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    json_schema: dict[str, Any] | None = None  # JSON output wanted; {} when no schema is given


@dataclass(slots=True)
class ChatResponse:
    id: str
    model: str
    parts: list[Text | ToolCall]
    stop_reason: StopReason
    stop_sequence: str | None = None
    usage: Usage | None = None


# ------------------------------------------------------------------ stream events
# A stream is: MessageStart, then per content block BlockStart, deltas, BlockStop,
# then MessageDelta (stop reason, final usage) and MessageStop. StreamError may end it early.

@dataclass(slots=True)
class MessageStart:
    id: str
    model: str
    usage: Usage | None = None


@dataclass(slots=True)
class BlockStart:
    index: int
    kind: Literal["text", "tool_call"]
    id: str = ""
    name: str = ""


@dataclass(slots=True)
class TextDelta:
    index: int
    text: str


@dataclass(slots=True)
class ArgsDelta:
    index: int
    json: str


@dataclass(slots=True)
class BlockStop:
    index: int


@dataclass(slots=True)
class MessageDelta:
    stop_reason: StopReason
    stop_sequence: str | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class MessageStop:
    pass


@dataclass(slots=True)
class StreamError:
    kind: str  # an Anthropic error type: api_error, overloaded_error, rate_limit_error, ...


Event = MessageStart | BlockStart | TextDelta | ArgsDelta | BlockStop | MessageDelta | MessageStop | StreamError
