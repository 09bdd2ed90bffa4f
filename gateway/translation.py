"""Which wire format goes where: pass-through when client and provider speak the same one,
translation through the canonical model (adapters/canonical.py) when they do not.

Three seams, each choosing once by (client api, provider type): `build_request` (what the
provider gets), `json_answer` (what a client gets from a whole answer) and `stream_tap`
(how a stream is relayed). OpenAI client -> OpenAI-type provider stays on dispatch's own
fast path and never comes here for requests.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from adapters import anthropic as anthropic_adapter
from adapters import naming
from adapters import openai as openai_adapter
from adapters.anthropic import ERROR_TYPES as ANTHROPIC_ERROR_TYPES
from adapters.base import Endpoint, UpstreamRequest, Usage
from adapters.canonical import TranslationError
from adapters.sse_anthropic import error_frame as anthropic_error_frame
from adapters.sse_openai import error_chunk as openai_error_chunk
from adapters.stream_translate import (
    StreamTap,
    anthropic_to_openai,
    openai_to_anthropic,
)
from adapters.translate_anthropic import (
    request_from_anthropic,
    request_to_anthropic,
    response_from_anthropic,
    response_to_anthropic,
)
from adapters.translate_openai import (
    request_from_openai,
    request_to_openai,
    response_from_openai,
    response_to_openai,
)
from gateway import tokens
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.parsing import ParsedRequest

CountedUsage = Callable[[str], Usage]
# Fixed texts: a value from the body or the upstream's answer is never echoed.
UNTRANSLATABLE = "the request has a field of the wrong type or shape for the chosen model's format"
UNREADABLE_ANSWER = "the upstream answer could not be read"


class TargetLike(Protocol):
    """gateway.dispatch.Target, structurally (dispatch imports this module, not the reverse)."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def endpoint(self) -> Endpoint: ...


def upstream_api(target: TargetLike) -> str:
    return "anthropic" if target.endpoint.type == "anthropic" else "openai"


def build_request(target: TargetLike, parsed: ParsedRequest) -> UpstreamRequest:
    """The upstream request for every pair except OpenAI -> OpenAI-type (dispatch's fast path)."""
    model, endpoint = target.model, target.endpoint
    if parsed.api == "anthropic" and upstream_api(target) == "anthropic":
        return anthropic_adapter.build_messages_request(endpoint, parsed.body, model.upstream_model,
                                                        beta=parsed.anthropic_beta)
    # Across formats the output cap always holds (budget bound) and never exceeds the model's.
    cap = min(parsed.max_output_tokens or model.max_output_tokens, model.max_output_tokens)
    try:
        if parsed.api == "anthropic":
            canonical = request_from_anthropic(parsed.body)
            key = "max_completion_tokens" if endpoint.type == "openai" else "max_tokens"
            body = request_to_openai(canonical, max_tokens_key=key, max_tokens=cap)
            return openai_adapter.build_chat_request(endpoint, body, model.upstream_model)
        body = request_to_anthropic(request_from_openai(parsed.body), max_tokens=cap)
        return anthropic_adapter.build_messages_request(endpoint, body, model.upstream_model)
    except TranslationError as exc:
        raise InvalidRequest(str(exc)) from None
    except (TypeError, ValueError, AttributeError, KeyError):  # a shape the translators did not foresee
        raise InvalidRequest(UNTRANSLATABLE) from None


def client_tool_names(parsed: ParsedRequest, target: TargetLike) -> dict[str, str]:
    """{upstream name: client name} for the client's tools the upstream format had to shorten."""
    tools = parsed.body.get("tools")
    if not tools or not isinstance(tools, list):
        return {}
    if parsed.api == "anthropic":
        names = [t.get("name") for t in tools if isinstance(t, dict)]
    else:
        names = [fn.get("name") for t in tools if isinstance(t, dict) and isinstance(fn := t.get("function"), dict)]
    return naming.name_table([n for n in names if isinstance(n, str)], upstream_api(target))


def json_answer(parsed: ParsedRequest, target: TargetLike, body: bytes,
                counted: CountedUsage) -> tuple[bytes, Usage, Callable[[], str]]:
    """(the client's body, usage for billing, the generated text on demand) from a whole answer.

    `counted` makes usage from generated text when the upstream reported none.
    """
    same = parsed.api == upstream_api(target)
    payload: Any = None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        if not same:
            raise UpstreamFailed(UNREADABLE_ANSWER) from None
    text_of = anthropic_adapter.message_text if upstream_api(target) == "anthropic" else openai_adapter.completion_text

    def produced() -> str:
        try:
            return text_of(payload)
        except (TypeError, ValueError, AttributeError, KeyError):  # a malformed answer: nothing to count
            return ""

    if same:  # forwarded as the upstream sent it, whatever its shape
        reported = (openai_adapter.usage_from_payload(payload) if parsed.api == "openai"
                    else anthropic_adapter.usage_from_message(payload))
        return body, reported or counted(produced()), produced
    try:
        names = client_tool_names(parsed, target)
        resp = response_from_openai(payload) if parsed.api == "anthropic" else response_from_anthropic(payload)
        resp.usage = resp.usage or counted(produced())
        rendered = (response_to_anthropic(resp, names=names) if parsed.api == "anthropic"
                    else response_to_openai(resp, names=names, created=int(time.time())))
        return orjson.dumps(rendered), resp.usage, produced
    except (TypeError, ValueError, AttributeError, KeyError):  # TranslationError is a ValueError
        raise UpstreamFailed(UNREADABLE_ANSWER) from None


def stream_tap(parsed: ParsedRequest, target: TargetLike) -> StreamTap:
    """How this stream is relayed: byte for byte with a usage tap, or translated event by event."""
    provider_api = upstream_api(target)
    if parsed.api == "openai" and provider_api == "openai":
        return openai_adapter.ChatStreamTap(client_wants_usage=parsed.client_wants_usage,
                                            input_estimate=parsed.input_tokens, count_text=tokens.count_text)
    if parsed.api == "anthropic" and provider_api == "anthropic":
        return anthropic_adapter.MessagesStreamTap()
    names = client_tool_names(parsed, target)
    if parsed.api == "anthropic":
        return openai_to_anthropic(names=names, input_estimate=parsed.input_tokens, count_text=tokens.count_text)
    return anthropic_to_openai(names=names, client_wants_usage=parsed.client_wants_usage, created=int(time.time()),
                               input_estimate=parsed.input_tokens, count_text=tokens.count_text)


def stream_error(api: str, kind: str = "api_error") -> bytes:
    """The frame that tells a client, in its own format, that the stream failed mid-way.

    `kind` is an Anthropic error type from a whitelist (a pass-through tap's `error_kind`, e.g.
    overloaded_error), so an Anthropic client sees what the upstream said, never its message."""
    if api == "anthropic":
        return anthropic_error_frame(kind if kind in ANTHROPIC_ERROR_TYPES else "api_error")
    return openai_error_chunk("api_error")


def anthropic_model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    """GET /v1/models as the Anthropic SDK reads it (one page, every model the tenant may use)."""
    data = [{"type": "model", "id": m["id"], "display_name": m["id"], "created_at": "1970-01-01T00:00:00Z"}
            for m in models]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
