"""Anthropic Messages wire format, for `anthropic` providers.

The upstream is authenticated with `x-api-key` and pinned to one `anthropic-version`;
a client's `anthropic-beta` header is forwarded. Request building and answer parsing
are pure; `MessagesStreamTap` relays an Anthropic stream unchanged while reading its usage.
"""
from __future__ import annotations

from typing import Any

import orjson

from adapters.base import Endpoint, UpstreamRequest, Usage
from adapters.sse import SseSplitter, event_fields

ANTHROPIC_VERSION = "2023-06-01"
# Error types an Anthropic stream may carry and a client may be shown; anything else is api_error.
ERROR_TYPES = frozenset({
    "api_error", "overloaded_error", "rate_limit_error", "invalid_request_error", "authentication_error",
    "permission_error", "not_found_error", "request_too_large", "timeout_error", "billing_error",
})


def _headers(endpoint: Endpoint, beta: str | None, stream: bool) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "anthropic-version": ANTHROPIC_VERSION,
    }
    if endpoint.api_key:
        headers["x-api-key"] = endpoint.api_key
    if beta:
        headers["anthropic-beta"] = beta
    return headers


def _url(endpoint: Endpoint, path: str) -> str:
    base = endpoint.base_url.rstrip("/")
    return f"{base}{path}" if base.endswith("/v1") else f"{base}/v1{path}"


def build_messages_request(
    endpoint: Endpoint, body: dict[str, Any], upstream_model: str, *, beta: str | None = None
) -> UpstreamRequest:
    """The body unchanged apart from the model name (a same-format or already translated body)."""
    payload = dict(body)
    payload["model"] = upstream_model
    stream = payload.get("stream") is True
    return UpstreamRequest(_url(endpoint, "/messages"), _headers(endpoint, beta, stream), orjson.dumps(payload), stream)


def build_count_tokens_request(
    endpoint: Endpoint, body: dict[str, Any], upstream_model: str, *, beta: str | None = None
) -> UpstreamRequest:
    payload = {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "stop_sequences", "temperature",
                                                          "top_p", "top_k", "metadata", "service_tier")}
    payload["model"] = upstream_model
    return UpstreamRequest(_url(endpoint, "/messages/count_tokens"), _headers(endpoint, beta, False),
                           orjson.dumps(payload), False)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_anthropic(raw: Any) -> Usage | None:
    """Normalise Anthropic usage: its `input_tokens` excludes cache reads and cache writes.

    Normalised input is every input token not read from cache (so cache writes are in it,
    and also counted in `cache_write_tokens` to be priced at their own rate).
    """
    if not isinstance(raw, dict):
        return None
    fresh = _int(raw.get("input_tokens"))
    written = _int(raw.get("cache_creation_input_tokens"))
    read = _int(raw.get("cache_read_input_tokens"))
    return Usage(input_tokens=fresh + written, output_tokens=_int(raw.get("output_tokens")),
                 cached_input_tokens=read, cache_write_tokens=written, raw=raw)


def usage_from_message(payload: Any) -> Usage | None:
    return usage_from_anthropic(payload.get("usage")) if isinstance(payload, dict) else None


def message_text(payload: Any) -> str:
    """All generated text of a non-streamed message (for offline counting)."""
    parts: list[str] = []
    if isinstance(payload, dict):
        for block in payload.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                parts.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_use":
                parts.append(str(block.get("name") or "") + orjson.dumps(block.get("input")).decode())
    return "".join(parts)


def merge_usage(into: dict[str, Any], update: Any) -> None:
    """message_delta usage is cumulative: later non-null values replace earlier ones."""
    if isinstance(update, dict):
        into.update({k: v for k, v in update.items() if v is not None})


class MessagesStreamTap:
    """Relays an Anthropic stream event for event, reading usage, text and completion as it goes.

    Complete events only are forwarded (a partial one waits for its end); error events and
    malformed frames are noted (`error_seen`) and dropped: the relay writes its own error frame,
    of the upstream's error type when it is a known one (`error_kind`), never with its message.
    """

    def __init__(self) -> None:
        self._splitter = SseSplitter()
        self._raw_usage: dict[str, Any] = {}
        self.usage: Usage | None = None
        self.text_parts: list[str] = []
        self.done = False
        self.content_started = False
        self.error_seen = False
        self.error_kind = "api_error"

    def feed(self, chunk: bytes) -> bytes:
        kept = [event for event in self._splitter.feed(chunk) if self._event(event)]
        return b"\n\n".join(kept) + b"\n\n" if kept else b""

    def flush(self) -> bytes:
        kept = [event for event in self._splitter.flush() if self._event(event)]
        return b"\n\n".join(kept) + b"\n\n" if kept else b""

    def _event(self, event: bytes) -> bool:
        """Read one event; whether it is forwarded."""
        name, data = event_fields(event)
        if name == b"ping" or not data:
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error_seen = True
            return False
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            piece = delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
            if piece:
                self.content_started = True
                self.text_parts.append(str(piece))
        elif kind == "content_block_start":
            block = obj.get("content_block") or {}
            # An empty text or thinking block is still preamble: content starts with its first delta.
            if not isinstance(block, dict) or block.get("type") not in ("text", "thinking") or block.get("text"):
                self.content_started = True
        elif kind == "message_start":
            # Its output count is provisional: usage is only final once message_delta comes.
            merge_usage(self._raw_usage, (obj.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            merge_usage(self._raw_usage, obj.get("usage"))
            self.usage = usage_from_anthropic(self._raw_usage)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error" or name == b"error":
            self.error_seen = True
            error = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(error, dict) and error.get("type") in ERROR_TYPES:
                self.error_kind = error["type"]
            return False
        return True
