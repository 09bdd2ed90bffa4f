"""Anthropic Messages <-> canonical: every Anthropic-side mapping table lives here.

Request direction: an Anthropic client's body -> canonical, and canonical -> the body an
Anthropic provider gets (system hoisted to `system`, same-role turns merged, tool results
first in their user turn). Answer direction: an Anthropic message -> canonical, and
canonical -> the message an Anthropic client gets.
"""
from __future__ import annotations

from typing import Any

import orjson

from adapters import naming
from adapters.anthropic import usage_from_message
from adapters.base import Usage
from adapters.canonical import (
    ChatRequest,
    ChatResponse,
    Image,
    Message,
    Part,
    StopReason,
    Text,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
    TranslationError,
    as_object,
    optional_number,
)

# ------------------------------------------------------------------ mapping tables
STOP_FROM_ANTHROPIC: dict[str, StopReason] = {
    "end_turn": "end",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_use",
    "refusal": "content_filter",
    "pause_turn": "pause",
}
STOP_TO_ANTHROPIC: dict[StopReason, str] = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_use": "tool_use",
    "content_filter": "refusal",
    "pause": "pause_turn",
}
TOOL_CHOICE_FROM_ANTHROPIC = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}
TOOL_CHOICE_TO_ANTHROPIC = {"auto": "auto", "required": "any", "tool": "tool", "none": "none"}
# Assistant blocks another format cannot take and that carry no answer: dropped in translation.
DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
MAX_TEMPERATURE = 1.0  # Anthropic's range is 0..1 (OpenAI's is 0..2)
JSON_INSTRUCTION = "Answer with a single JSON object and nothing else."


# ------------------------------------------------------------------ client body -> canonical
def request_from_anthropic(body: dict[str, Any]) -> ChatRequest:
    """An Anthropic Messages request as canonical (the body was checked by the edge)."""
    tools = [_tool_from(t) for t in body.get("tools") or ()]
    choice, parallel = _choice_from(body.get("tool_choice"))
    return ChatRequest(
        messages=[_message_from(m) for m in body["messages"]],
        system=_system_from(body.get("system")),
        max_tokens=body.get("max_tokens"),
        stream=body.get("stream") is True,
        temperature=optional_number(body, "temperature"),
        top_p=optional_number(body, "top_p"),
        stop=[s for s in body.get("stop_sequences") or () if isinstance(s, str)],
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        user=_user_from(body.get("metadata")),
    )


def _user_from(metadata: Any) -> str | None:
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if user is not None and not isinstance(user, str):
        raise TranslationError("'metadata.user_id' must be a string")
    return user or None


def _system_from(system: Any) -> list[str]:
    if isinstance(system, str):
        return [system] if system else []
    if isinstance(system, list):
        return [b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str) and b["text"]]
    return []


def _tool_from(tool: Any) -> Tool:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise TranslationError("each tool needs a string 'name'")
    if tool.get("type") not in (None, "custom"):
        raise TranslationError(f"tool type '{tool['type']}' is only available on Anthropic models")
    schema, description = tool.get("input_schema"), tool.get("description")
    if description is not None and not isinstance(description, str):
        raise TranslationError("a tool's 'description' must be a string")
    return Tool(tool["name"], description, schema if isinstance(schema, dict) else {})


def _choice_from(choice: Any) -> tuple[ToolChoice | None, bool | None]:
    if not isinstance(choice, dict):
        return None, None
    mode = TOOL_CHOICE_FROM_ANTHROPIC.get(str(choice.get("type")))
    if mode is None:
        raise TranslationError("'tool_choice.type' must be auto, any, tool or none")
    name = choice.get("name") if mode == "tool" else None
    if mode == "tool" and (not isinstance(name, str) or not name):
        raise TranslationError("'tool_choice.name' must name a tool when 'tool_choice.type' is 'tool'")
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    return ToolChoice(mode, name), parallel  # type: ignore[arg-type]


def _message_from(message: dict[str, Any]) -> Message:
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise TranslationError("message roles must be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        return Message(role, [Text(content)] if content else [])
    parts: list[Part] = []
    for block in content or ():
        part = _part_from(block)
        if part is not None:
            parts.append(part)
    return Message(role, parts)


def _part_from(block: Any) -> Part | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise TranslationError("a 'text' block needs a string 'text'")
        return Text(block["text"])
    if kind == "image":
        return _image_from(block)
    if kind == "tool_use":
        args = orjson.dumps(block.get("input") if block.get("input") is not None else {}).decode()
        return ToolCall(naming.original_tool_id(str(block.get("id") or "")), str(block.get("name") or ""), args)
    if kind == "tool_result":
        return _result_from(block)
    if kind in DROPPED_BLOCKS:
        return None
    raise TranslationError(f"content block type '{kind}' is only available on Anthropic models")


def _image_from(block: dict[str, Any]) -> Image:
    source = as_object(block.get("source"))
    media_type = source.get("media_type")
    if source.get("type") == "base64" and isinstance(source.get("data"), str) and (
            media_type is None or isinstance(media_type, str)):
        return Image(media_type=media_type, data=source["data"])
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return Image(url=source["url"])
    raise TranslationError("images must have a base64 source (string 'data') or a url source (string 'url') "
                           "for this model")


def _result_from(block: dict[str, Any]) -> ToolResult:
    content = block.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise TranslationError("'tool_result.content' must be a string or an array of blocks")
    parts: list[Text | Image] = []
    if isinstance(content, str):
        parts.append(Text(content))
    for item in content if isinstance(content, list) else ():
        part = _part_from(item)
        if isinstance(part, (Text, Image)):
            parts.append(part)
    return ToolResult(naming.original_tool_id(str(block.get("tool_use_id") or "")), parts,
                      block.get("is_error") is True)


# ------------------------------------------------------------------ canonical -> provider body
def request_to_anthropic(req: ChatRequest, *, max_tokens: int) -> dict[str, Any]:
    """The body an Anthropic provider gets (model is set by the adapter)."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "messages": _turns(req.messages)}
    system = list(req.system)
    if req.json_schema is not None:
        schema = f" It must match this JSON schema: {orjson.dumps(req.json_schema).decode()}" if req.json_schema else ""
        system.append(JSON_INSTRUCTION + schema)
    if system:
        body["system"] = system[0] if len(system) == 1 else [{"type": "text", "text": s} for s in system]
    if req.stop:
        body["stop_sequences"] = req.stop
    if req.temperature is not None:
        body["temperature"] = min(req.temperature, MAX_TEMPERATURE)
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.tools:
        body["tools"] = [_tool_to(t) for t in req.tools]
        choice = _choice_to(req.tool_choice, req.parallel_tool_calls)
        if choice is not None:
            body["tool_choice"] = choice
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.stream:
        body["stream"] = True
    return body


def _tool_to(tool: Tool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": naming.short_name(tool.name, naming.NAME_LIMITS["anthropic"]),
                           "input_schema": tool.parameters or {"type": "object", "properties": {}}}
    if tool.description:
        out["description"] = tool.description
    return out


def _choice_to(choice: ToolChoice | None, parallel: bool | None) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None
    mode = choice.mode if choice is not None else "auto"
    out: dict[str, Any] = {"type": TOOL_CHOICE_TO_ANTHROPIC[mode]}
    if mode == "tool" and choice is not None and choice.name:
        out["name"] = naming.short_name(choice.name, naming.NAME_LIMITS["anthropic"])
    if parallel is False and mode != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _turns(messages: list[Message]) -> list[dict[str, Any]]:
    """Alternating turns: empty messages dropped, consecutive same-role messages merged."""
    merged: list[Message] = []
    for message in messages:
        parts = [p for p in message.parts if not (isinstance(p, Text) and not p.text)]
        if not parts:
            continue
        if merged and merged[-1].role == message.role:
            merged[-1].parts.extend(parts)
        else:
            merged.append(Message(message.role, parts))
    return [_turn(m) for m in merged]


def _turn(message: Message) -> dict[str, Any]:
    # Tool results must open the user turn that answers the tool calls.
    results = [p for p in message.parts if isinstance(p, ToolResult)]
    others = [p for p in message.parts if not isinstance(p, ToolResult)]
    if not results and len(others) == 1 and isinstance(others[0], Text):
        return {"role": message.role, "content": others[0].text}
    return {"role": message.role, "content": [_block_to(p) for p in [*results, *others]]}


def _block_to(part: Part) -> dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    if isinstance(part, Image):
        if part.data is not None:
            return {"type": "image", "source": {"type": "base64", "media_type": part.media_type or "image/png",
                                                "data": part.data}}
        return {"type": "image", "source": {"type": "url", "url": part.url or ""}}
    if isinstance(part, ToolCall):
        return {"type": "tool_use", "id": naming.anthropic_tool_id(part.id),
                "name": naming.short_name(part.name, naming.NAME_LIMITS["anthropic"]),
                "input": arguments_object(part.arguments)}
    content: list[dict[str, Any]] = [_block_to(p) for p in part.content if not (isinstance(p, Text) and not p.text)]
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": naming.anthropic_tool_id(part.call_id)}
    if len(content) == 1 and content[0]["type"] == "text":
        block["content"] = content[0]["text"]
    elif content:
        block["content"] = content
    if part.is_error:
        block["is_error"] = True
    return block


def arguments_object(arguments: str) -> dict[str, Any]:
    """Tool-call arguments as the object Anthropic wants; text that is not an object is kept, wrapped."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


# ------------------------------------------------------------------ answers
def response_from_anthropic(payload: Any) -> ChatResponse:
    """An Anthropic message (from a provider) as canonical."""
    if not isinstance(payload, dict):
        raise TranslationError("the upstream answer is not a message")
    content = payload.get("content")
    if content is not None and not isinstance(content, list):
        raise TranslationError("the upstream message's content is not an array")
    parts: list[Text | ToolCall] = []
    for block in content or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(Text(str(block.get("text") or "")))
        elif kind == "tool_use":
            args = orjson.dumps(block.get("input") if block.get("input") is not None else {}).decode()
            parts.append(ToolCall(str(block.get("id") or ""), str(block.get("name") or ""), args))
    return ChatResponse(
        id=str(payload.get("id") or ""),
        model=str(payload.get("model") or ""),
        parts=parts,
        stop_reason=STOP_FROM_ANTHROPIC.get(str(payload.get("stop_reason")), "end"),
        stop_sequence=payload.get("stop_sequence") if isinstance(payload.get("stop_sequence"), str) else None,
        usage=usage_from_message(payload),
    )


def usage_to_anthropic(usage: Usage) -> dict[str, int]:
    """Anthropic usage from normalised usage: its input_tokens excludes cache reads and writes."""
    return {
        "input_tokens": max(usage.input_tokens - usage.cache_write_tokens, 0),
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
    }


def response_to_anthropic(resp: ChatResponse, *, names: dict[str, str]) -> dict[str, Any]:
    """The message an Anthropic client gets; `names` maps shortened tool names back."""
    content: list[dict[str, Any]] = []
    for part in resp.parts:
        if isinstance(part, Text):
            if part.text:
                content.append({"type": "text", "text": part.text})
        else:
            content.append({"type": "tool_use", "id": naming.anthropic_tool_id(part.id),
                            "name": naming.to_client_name(part.name, names),
                            "input": arguments_object(part.arguments)})
    return {
        "id": resp.id,
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": content,
        "stop_reason": STOP_TO_ANTHROPIC[resp.stop_reason],
        "stop_sequence": resp.stop_sequence,
        "usage": usage_to_anthropic(resp.usage or Usage()),
    }
