"""The OpenAI-format edge: read and check just what routing and budgets need.

The body is kept as parsed JSON and forwarded with minimal changes; only the fields
the gateway acts on are type-checked here, with a clear 400 for each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from gateway import tokens
from gateway.errors import InvalidRequest, RequestTooLarge

#: The largest output cap a request may ask for: far above any model's, and small enough that
#: a worst case (times MAX_CHOICES) stays exact in every store's integer counters.
MAX_OUTPUT_TOKENS = 2**31
#: The most choices (OpenAI `n`) one request may ask for; each multiplies the output.
MAX_CHOICES = 128


@dataclass
class ParsedRequest:
    api: str  # openai | anthropic
    endpoint: str  # chat | embeddings
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
    max_output_tokens: int | None
    capabilities: frozenset[str]
    input_tokens: int  # offline count
    input_tokens_bound: int  # upper bound used for reservations
    anthropic_beta: str | None = None  # the client's anthropic-beta header, forwarded to Anthropic providers
    choices: int = 1  # OpenAI `n`: the worst-case output is choices x the output cap


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    return model


def _optional_int(body: dict[str, Any], key: str, most: int = MAX_OUTPUT_TOKENS) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    return bounded_int(value, key, most)


def bounded_int(value: Any, key: str, most: int = MAX_OUTPUT_TOKENS) -> int:
    """``value`` if it is an integer in 1..most, else a 400 naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidRequest(f"'{key}' must be an integer from 1 to {most}", param=key)
    return value


def _max_output(body: dict[str, Any]) -> int | None:
    """The output cap to reserve for: the larger of the two fields when both are given (an
    openai_compatible server may honour either)."""
    newer, older = _optional_int(body, "max_completion_tokens"), _optional_int(body, "max_tokens")
    if newer is None or older is None:
        return newer if older is None else older
    return max(newer, older)


def parse_chat(raw: bytes) -> ParsedRequest:
    body = load_json_object(raw)
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a string 'role'", param=f"messages[{i}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    max_out = _max_output(body)
    choices = _optional_int(body, "n", MAX_CHOICES) or 1
    counted = tokens.estimate_chat_input(body)
    return ParsedRequest(
        api="openai",
        endpoint="chat",
        body=body,
        model=model,
        stream=stream,
        client_wants_usage=bool(stream and options and options.get("include_usage")),
        max_output_tokens=max_out,
        capabilities=_chat_capabilities(body),
        input_tokens=counted,
        input_tokens_bound=tokens.upper_bound(counted),
        choices=choices,
    )


def _chat_capabilities(body: dict[str, Any]) -> frozenset[str]:
    needs = {"chat"}
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in content
        ):
            needs.add("vision")
    return frozenset(needs)


def parse_embeddings(raw: bytes) -> ParsedRequest:
    body = load_json_object(raw)
    model = _require_model(body)
    value = body.get("input")
    if not (isinstance(value, str) and value) and not (isinstance(value, list) and value):
        raise InvalidRequest("'input' must be a non-empty string or array", param="input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    counted = tokens.estimate_embedding_input(body)
    return ParsedRequest(
        api="openai",
        endpoint="embeddings",
        body=body,
        model=model,
        stream=False,
        client_wants_usage=False,
        max_output_tokens=0,
        capabilities=frozenset({"embeddings"}),
        input_tokens=counted,
        input_tokens_bound=tokens.upper_bound(counted),
    )
