"""OpenAI Chat Completions / Embeddings wire format, for `openai` and `openai_compatible`
providers (OpenAI, vLLM, Ollama, llama.cpp, ...).

Request building and answer parsing are pure; the stream tap is a small state machine
fed with raw bytes as they arrive, so nothing is buffered beyond one SSE event.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from adapters.base import Endpoint, UpstreamRequest, Usage


def _headers(endpoint: Endpoint) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json"}
    if endpoint.api_key:
        headers["authorization"] = f"Bearer {endpoint.api_key}"
    return headers


def build_chat_request(
    endpoint: Endpoint,
    body: dict[str, Any],
    upstream_model: str,
    *,
    max_output_tokens: int | None = None,
) -> UpstreamRequest:
    """The client's body with the upstream model name, usage always requested on streams,
    and an output cap filled in when the client gave none (so the budget bound holds)."""
    payload = dict(body)
    payload["model"] = upstream_model
    stream = bool(payload.get("stream"))
    if stream:
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
    if max_output_tokens is not None and "max_tokens" not in payload and "max_completion_tokens" not in payload:
        key = "max_completion_tokens" if endpoint.type == "openai" else "max_tokens"
        payload[key] = max_output_tokens
    headers = _headers(endpoint)
    if stream:
        headers["accept"] = "text/event-stream"
    return UpstreamRequest(
        url=endpoint.base_url.rstrip("/") + "/chat/completions",
        headers=headers,
        body=orjson.dumps(payload),
        stream=stream,
    )


def build_embeddings_request(endpoint: Endpoint, body: dict[str, Any], upstream_model: str) -> UpstreamRequest:
    payload = dict(body)
    payload["model"] = upstream_model
    return UpstreamRequest(
        url=endpoint.base_url.rstrip("/") + "/embeddings",
        headers=_headers(endpoint),
        body=orjson.dumps(payload),
        stream=False,
    )


def usage_from_payload(payload: Any) -> Usage | None:
    """Usage from a chat/embeddings answer or a stream's usage chunk; None when absent."""
    if not isinstance(payload, dict):
        return None
    raw = payload.get("usage")
    if not isinstance(raw, dict):
        return None
    prompt = _int(raw.get("prompt_tokens"))
    completion = _int(raw.get("completion_tokens"))
    details = raw.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return Usage(input_tokens=prompt - cached, output_tokens=completion, cached_input_tokens=cached, raw=raw)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def completion_text(payload: Any) -> str:
    """All generated text of a non-streamed chat answer (for offline counting)."""
    parts: list[str] = []
    if isinstance(payload, dict):
        for choice in payload.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                parts.append(str(message.get("content") or ""))
                for call in message.get("tool_calls") or ():
                    if isinstance(call, dict) and isinstance(call.get("function"), dict):
                        fn = call["function"]
                        parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(parts)


class ChatStreamTap:
    """Watches an OpenAI SSE stream as it is relayed.

    Captures usage (and the text, for offline counting when no usage comes), notes
    whether `[DONE]` and content arrived, and strips the usage chunk when the client
    did not ask for it (the gateway always asks upstream). Error events and malformed
    frames are noted (`error_seen`) and dropped: the relay writes its own error frame.
    """

    def __init__(
        self,
        *,
        client_wants_usage: bool,
        input_estimate: int = 0,
        count_text: Callable[[str], int] | None = None,
    ) -> None:
        self._client_wants_usage = client_wants_usage
        self._input_estimate = input_estimate
        self._count_text = count_text
        self._buffer = b""
        self._tool_calls_seen: set[tuple[int, int]] = set()
        self._chunk_meta: dict[str, Any] = {}
        self.usage: Usage | None = None
        self.text_parts: list[str] = []
        self.done = False
        self.content_started = False
        self.error_seen = False
        self.finish_reason: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now: every complete event in the buffer, possibly rewritten."""
        buffer = self._buffer + chunk
        if b"\r\n" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return b""
        complete, self._buffer = buffer[: end + 2], buffer[end + 2 :]
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            if event:
                kept = self._event(event)
                if kept is not None:
                    out.append(kept)
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def flush(self) -> bytes:
        """Whatever trailing partial event is left when the upstream closes."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            kept = self._event(rest.strip(b"\n"))
            return kept + b"\n\n" if kept is not None else b""
        return b""

    def _event(self, event: bytes) -> bytes | None:
        data = _data_of(event)
        if data is None:
            return event
        if data == b"[DONE]":
            self.done = True
            if self._client_wants_usage and self.usage is None and self._count_text is not None:
                return self._counted_usage_event() + b"\n\n" + event
            return event
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error_seen = True  # a malformed frame: dropped; the relay ends the stream with its own error
            return None
        if not isinstance(obj, dict):
            return event
        if "error" in obj:
            self.error_seen = True  # never forwarded: it may echo the prompt (the relay writes a fixed one)
            return None
        if not self._chunk_meta:
            self._chunk_meta = {k: obj[k] for k in ("id", "created", "model", "system_fingerprint") if k in obj}
        rewritten = self._note_choices(obj.get("choices"))
        usage = usage_from_payload(obj)
        if usage is None:
            return b"data: " + orjson.dumps(obj) if rewritten else event
        self.usage = usage
        if self._client_wants_usage:
            return b"data: " + orjson.dumps(obj) if rewritten else event
        if not obj.get("choices"):
            return None
        obj.pop("usage", None)
        return b"data: " + orjson.dumps(obj)

    def _note_choices(self, choices: Any) -> bool:
        """Record text and finish reasons; return True when a delta was rewritten."""
        if not isinstance(choices, list):
            return False
        rewritten = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if content:
                self.content_started = True
                self.text_parts.append(str(content))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    rewritten |= self._note_tool_call(choice.get("index", 0), call)
        return rewritten

    def _note_tool_call(self, choice_index: Any, call: dict[str, Any]) -> bool:
        """Keep id/type/name on the first fragment of each tool call only, as OpenAI sends them.

        Some servers (llama.cpp) repeat them on every fragment, which SDK accumulators
        concatenate into names like `get_weatherget_weather`.
        """
        fn = call.get("function")
        if isinstance(fn, dict):
            self.content_started = True
            self.text_parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
        key = (choice_index if isinstance(choice_index, int) else 0, call.get("index", 0))
        if key not in self._tool_calls_seen:
            self._tool_calls_seen.add(key)
            return False
        repeated: list[str] = [k for k in ("id", "type") if k in call]
        for k in repeated:
            del call[k]
        if isinstance(fn, dict) and "name" in fn:
            del fn["name"]
            repeated.append("name")
        return bool(repeated)

    def _counted_usage_event(self) -> bytes:
        """The usage chunk the client asked for, counted by the gateway when upstream sent none."""
        assert self._count_text is not None
        output = self._count_text("".join(self.text_parts))
        self.usage = Usage(input_tokens=self._input_estimate, output_tokens=output, estimated=True)
        chunk = {
            **self._chunk_meta, "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": self._input_estimate, "completion_tokens": output,
                      "total_tokens": self._input_estimate + output},
        }
        return b"data: " + orjson.dumps(chunk)


def _data_of(event: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (multi-line data joined), or None."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
