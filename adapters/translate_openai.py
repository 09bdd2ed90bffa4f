"""OpenAI Chat Completions <-> canonical: every OpenAI-side mapping table lives here.

Request direction: an OpenAI client's body -> canonical (system/developer messages
hoisted, `tool` messages become tool results of a user turn), and canonical -> the body
an OpenAI-type provider gets. Answer direction: an OpenAI completion -> canonical, and
canonical -> the completion an OpenAI client gets.
"""
from __future__ import annotations

from typing import Any

import orjson

from adapters import naming
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
    optional_number,
)
from adapters.openai import usage_from_payload

# ------------------------------------------------------------------ mapping tables
FINISH_FROM_OPENAI: dict[str, StopReason] = {
    "stop": "end",
    "length": "length",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "content_filter",
}
FINISH_TO_OPENAI: dict[StopReason, str] = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_use": "tool_calls",
    "content_filter": "content_filter",
    "pause": "stop",
}
SYSTEM_ROLES = frozenset({"system", "developer"})
TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})
MAX_STOP_SEQUENCES = 4  # OpenAI rejects more
ERROR_PREFIX = "[tool error] "  # OpenAI tool messages have no error flag


# ------------------------------------------------------------------ client body -> canonical
def request_from_openai(body: dict[str, Any]) -> ChatRequest:
    """An OpenAI chat request as canonical (the body was checked by the edge)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise TranslationError("'n' greater than 1 is not supported by this model")
    system: list[str] = []
    messages: list[Message] = []
    for message in body["messages"]:
        role = message["role"]
        _check_content(message.get("content"))
        if role in SYSTEM_ROLES:
            text = content_text(message.get("content"))
            if text:
                system.append(text)
        elif role == "user":
            messages.append(Message("user", _user_parts(message.get("content"))))
        elif role == "assistant":
            messages.append(Message("assistant", _assistant_parts(message)))
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id") or message.get("name") or ""
            messages.append(Message("user", [ToolResult(str(call_id), [Text(content_text(message.get("content")))])]))
        else:
            raise TranslationError(f"message role '{role}' is not supported")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return ChatRequest(
        messages=messages,
        system=system,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        stream=body.get("stream") is True,
        temperature=optional_number(body, "temperature"),
        top_p=optional_number(body, "top_p"),
        stop=_stop_from(body.get("stop")),
        tools=[_tool_from(t) for t in body.get("tools") or ()],
        tool_choice=_choice_from(body.get("tool_choice")),
        parallel_tool_calls=body.get("parallel_tool_calls") if isinstance(body.get("parallel_tool_calls"), bool) else None,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
        json_schema=_json_wanted(body.get("response_format")),
    )


def _stop_from(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise TranslationError("'stop' must be a string or an array of strings")


def _check_content(content: Any) -> None:
    if content is not None and not isinstance(content, (str, list)):
        raise TranslationError("a message's 'content' must be a string or an array of content parts")


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in content if isinstance(p, dict))
    return ""


def _user_parts(content: Any) -> list[Part]:
    if isinstance(content, str):
        return [Text(content)]
    parts: list[Part] = []
    for item in content or ():
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise TranslationError("a 'text' content part needs a string 'text'")
            parts.append(Text(text))
        elif kind == "image_url":
            parts.append(_image_from(item.get("image_url")))
        else:
            raise TranslationError(f"content part type '{kind}' is not supported by this model")
    return parts


def _image_from(image: Any) -> Image:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise TranslationError("'image_url.url' must be a non-empty string")
    if url.startswith("data:") and ";base64," in url:
        head, _, data = url.partition(";base64,")
        return Image(media_type=head[5:] or None, data=data)
    return Image(url=url)


def _assistant_parts(message: dict[str, Any]) -> list[Part]:
    parts: list[Part] = []
    text = content_text(message.get("content")) or (message.get("refusal") or "")
    if text:
        parts.append(Text(str(text)))
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise TranslationError("'tool_calls' must be an array")
    for call in calls or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise TranslationError("each tool call needs a 'function' with a string 'name'")
        parts.append(ToolCall(str(call.get("id") or ""), fn["name"], _arguments_text(fn.get("arguments"))))
    return parts


def _arguments_text(arguments: Any) -> str:
    """Tool-call arguments as JSON text; an object (sent by some clients) is serialised."""
    if arguments is None or isinstance(arguments, str):
        return arguments or ""
    if isinstance(arguments, dict):
        return orjson.dumps(arguments).decode()
    raise TranslationError("tool call 'arguments' must be a JSON string")


def _tool_from(tool: Any) -> Tool:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise TranslationError("only 'function' tools with a string name are supported by this model")
    params, description = fn.get("parameters"), fn.get("description")
    if description is not None and not isinstance(description, str):
        raise TranslationError("a tool's 'description' must be a string")
    return Tool(fn["name"], description, params if isinstance(params, dict) else {})


def _choice_from(choice: Any) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in TOOL_CHOICE_MODES:
        return ToolChoice(choice)  # type: ignore[arg-type]
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return ToolChoice("tool", fn["name"])
    raise TranslationError("'tool_choice' must be auto, none, required or a named function")


def _json_wanted(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {}
    return None


# ------------------------------------------------------------------ canonical -> provider body
def request_to_openai(req: ChatRequest, *, max_tokens_key: str, max_tokens: int | None) -> dict[str, Any]:
    """The body an OpenAI-type provider gets (model and stream options are set by the adapter)."""
    limit = naming.NAME_LIMITS["openai"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": s} for s in req.system]
    for message in req.messages:
        messages.extend(_assistant_to(message, limit) if message.role == "assistant" else _user_to(message))
    body: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        body[max_tokens_key] = max_tokens
    if req.stream:
        body["stream"] = True
    for key, value in (("temperature", req.temperature), ("top_p", req.top_p), ("user", req.user)):
        if value is not None:
            body[key] = value
    if req.stop:
        body["stop"] = req.stop[:MAX_STOP_SEQUENCES]
    if req.tools:
        body["tools"] = [{"type": "function", "function": _function_to(t, limit)} for t in req.tools]
        if req.tool_choice is not None:
            body["tool_choice"] = (req.tool_choice.mode if req.tool_choice.mode != "tool" else
                                   {"type": "function", "function": {"name": naming.short_name(req.tool_choice.name or "", limit)}})
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.json_schema is not None:
        body["response_format"] = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": req.json_schema}}
                                   if req.json_schema else {"type": "json_object"})
    return body


def _function_to(tool: Tool, limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": naming.short_name(tool.name, limit),
                           "parameters": tool.parameters or {"type": "object", "properties": {}}}
    if tool.description:
        out["description"] = tool.description
    return out


def _assistant_to(message: Message, limit: int) -> list[dict[str, Any]]:
    text = "".join(p.text for p in message.parts if isinstance(p, Text))
    calls = [{"id": p.id, "type": "function", "function": {"name": naming.short_name(p.name, limit),
                                                            "arguments": p.arguments or "{}"}}
             for p in message.parts if isinstance(p, ToolCall)]
    out: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        out["tool_calls"] = calls
    return [out]


def _user_to(message: Message) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (first, in order); the rest one user message."""
    out: list[dict[str, Any]] = []
    rest: list[Text | Image] = []
    for part in message.parts:
        if isinstance(part, ToolResult):
            text = "".join(p.text for p in part.content if isinstance(p, Text))
            out.append({"role": "tool", "tool_call_id": part.call_id,
                        "content": (ERROR_PREFIX + text) if part.is_error else text})
            rest.extend(p for p in part.content if isinstance(p, Image))  # tool messages take text only
        elif isinstance(part, (Text, Image)):
            rest.append(part)
    if rest:
        if len(rest) == 1 and isinstance(rest[0], Text):
            out.append({"role": "user", "content": rest[0].text})
        else:
            out.append({"role": "user", "content": [_content_part(p) for p in rest]})
    return out


def _content_part(part: Text | Image) -> dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    url = f"data:{part.media_type or 'image/png'};base64,{part.data}" if part.data is not None else part.url
    return {"type": "image_url", "image_url": {"url": url}}


# ------------------------------------------------------------------ answers
def response_from_openai(payload: Any) -> ChatResponse:
    """An OpenAI completion (from a provider) as canonical; only the first choice is used."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TranslationError("the upstream answer has no choices")
    answer_id = str(payload.get("id") or "")
    choice = choices[0]
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise TranslationError("the upstream answer's message is not an object")
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise TranslationError("the upstream answer's tool calls are not an array")
    parts: list[Text | ToolCall] = []
    text = content_text(message.get("content"))
    refusal = message.get("refusal")
    if text or refusal:
        parts.append(Text(text or str(refusal)))
    for i, call in enumerate(calls or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            parts.append(ToolCall(str(call.get("id") or f"call_{answer_id}_{i}"), str(fn.get("name") or ""),
                                  str(fn.get("arguments") or "")))
    stop = "content_filter" if refusal else FINISH_FROM_OPENAI.get(str(choice.get("finish_reason")), "end")
    return ChatResponse(answer_id, str(payload.get("model") or ""), parts, stop, None, usage_from_payload(payload))


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    """OpenAI usage from normalised usage: its prompt_tokens includes cached tokens."""
    prompt = usage.input_tokens + usage.cached_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def response_to_openai(resp: ChatResponse, *, names: dict[str, str], created: int) -> dict[str, Any]:
    """The completion an OpenAI client gets; `names` maps shortened tool names back."""
    text = "".join(p.text for p in resp.parts if isinstance(p, Text))
    calls = [{"id": p.id, "type": "function",
              "function": {"name": naming.to_client_name(p.name, names), "arguments": p.arguments}}
             for p in resp.parts if isinstance(p, ToolCall)]
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": resp.id,
        "object": "chat.completion",
        "created": created,
        "model": resp.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH_TO_OPENAI[resp.stop_reason]}],
        "usage": usage_to_openai(resp.usage or Usage()),
    }
