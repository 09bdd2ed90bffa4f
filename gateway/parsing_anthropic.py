"""The Anthropic-format edge: check what routing and budgets need, count the input offline.

Produces the same `ParsedRequest` as the OpenAI edge (api="anthropic"); the body is kept
as parsed JSON and, for Anthropic providers, forwarded unchanged apart from the model.
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway import tokens
from gateway.errors import InvalidRequest
from gateway.parsing import ParsedRequest, bounded_int, load_json_object

_ROLES = ("user", "assistant")


def parse_messages(raw: bytes, beta: str | None = None) -> ParsedRequest:
    """POST /v1/messages: `max_tokens` is required, as on Anthropic's own API."""
    body = load_json_object(raw)
    model = _check_common(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    max_tokens = bounded_int(max_tokens, "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise InvalidRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
    return _parsed(body, model, "chat", stream, max_tokens, beta)


def parse_count_tokens(raw: bytes, beta: str | None = None) -> ParsedRequest:
    """POST /v1/messages/count_tokens: a messages body without `max_tokens`."""
    body = load_json_object(raw)
    model = _check_common(body)
    return _parsed(body, model, "count_tokens", False, 0, beta)


def _parsed(body: dict[str, Any], model: str, endpoint: str, stream: bool, max_tokens: int,
            beta: str | None) -> ParsedRequest:
    counted = estimate_messages_input(body)
    return ParsedRequest(
        api="anthropic",
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream,
        client_wants_usage=False,  # Anthropic streams always carry usage
        max_output_tokens=max_tokens,
        capabilities=_capabilities(body),
        input_tokens=counted,
        input_tokens_bound=tokens.upper_bound(counted),
        anthropic_beta=beta,
    )


def _check_common(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidRequest(f"'messages[{i}].role' must be 'user' or 'assistant'", param=f"messages[{i}]")
        content = message.get("content")
        if not isinstance(content, str) and not (
            isinstance(content, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content)
        ):
            raise InvalidRequest(f"'messages[{i}].content' must be a string or an array of content blocks",
                                 param=f"messages[{i}].content")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise InvalidRequest("'system' must be a string or an array of text blocks", param="system")
    for key in ("tools",):
        if body.get(key) is not None and not isinstance(body[key], list):
            raise InvalidRequest(f"'{key}' must be an array", param=key)
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, dict):
        raise InvalidRequest("'tool_choice' must be an object", param="tool_choice")
    return model


def _capabilities(body: dict[str, Any]) -> frozenset[str]:
    needs = {"chat"}
    if body.get("tools"):
        needs.add("tools")
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list) and any(b.get("type") in ("image", "document") for b in content):
            needs.add("vision")
    return frozenset(needs)


def estimate_messages_input(body: dict[str, Any]) -> int:
    """cl100k count of everything the model reads: system, every block of every turn, tool definitions."""
    texts: list[str] = []
    images = _collect(body.get("system"), texts)
    messages = body.get("messages") or []
    for message in messages:
        if isinstance(message, dict):
            images += _collect(message.get("content"), texts)
    if body.get("tools"):
        texts.append(orjson.dumps(body["tools"]).decode())
    if body.get("tool_choice"):
        texts.append(orjson.dumps(body["tool_choice"]).decode())
    counted = tokens.count_text("\n".join(texts))
    return counted + tokens.PER_REQUEST_OVERHEAD + tokens.PER_MESSAGE_OVERHEAD * len(messages) + tokens.IMAGE_TOKENS * images


def _collect(content: Any, texts: list[str]) -> int:
    """Append the text of a string or a list of blocks; return how many images/documents it holds."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    images = 0
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("image", "document"):
            images += 1
        elif kind == "tool_use":
            texts.append(str(block.get("name") or "") + orjson.dumps(block.get("input")).decode())
        elif kind == "tool_result":
            images += _collect(block.get("content"), texts)
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            texts.append(block["thinking"])
    return images
