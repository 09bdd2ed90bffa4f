"""Relay an upstream stream in the other format: parse into canonical events, render out.

`TranslatingTap` has the same face as the pass-through taps (`feed`, `flush`, `usage`,
`text_parts`, `done`, `content_started`, `error_seen`), so the gateway relays every
stream the same way. It works event by event: nothing is buffered beyond one SSE event.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from adapters.base import Usage
from adapters.canonical import (
    ArgsDelta,
    BlockStart,
    Event,
    MessageDelta,
    MessageStop,
    StreamError,
    TextDelta,
)
from adapters.sse import SseSplitter, event_fields
from adapters.sse_anthropic import AnthropicStreamParser, AnthropicStreamRenderer
from adapters.sse_openai import OpenAIStreamParser, OpenAIStreamRenderer


class StreamTap(Protocol):
    """What the relay needs from any stream tap, translating or not."""

    usage: Usage | None
    text_parts: list[str]
    done: bool
    content_started: bool
    error_seen: bool

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class StreamParser(Protocol):
    def feed(self, data: bytes) -> list[Event]: ...

    def end(self) -> list[Event]: ...


class StreamRenderer(Protocol):
    def render(self, event: Event) -> bytes: ...


class TranslatingTap:
    renders_errors = True  # a stream error becomes the client format's error frame here (the relay adds none)

    def __init__(self, parser: StreamParser, renderer: StreamRenderer, *, count_text: Callable[[str], int],
                 input_estimate: int) -> None:
        self._splitter = SseSplitter()
        self._parser = parser
        self._renderer = renderer
        self._count_text = count_text
        self._input_estimate = input_estimate
        self.usage: Usage | None = None  # only what the upstream reported
        self.text_parts: list[str] = []
        self.done = False
        self.content_started = False
        self.error_seen = False

    def feed(self, chunk: bytes) -> bytes:
        return b"".join([self._event(event) for event in self._splitter.feed(chunk)])

    def flush(self) -> bytes:
        """The rest when the upstream ends; an unfinished message ends with an error frame."""
        out = [self._event(event) for event in self._splitter.flush()]
        if not self.done and not self.error_seen:
            out.extend(self._render(event) for event in self._parser.end())
        if not self.done and not self.error_seen:
            out.append(self._render(StreamError("api_error")))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        _, data = event_fields(event)
        if not data:
            return b""
        return b"".join([self._render(e) for e in self._parser.feed(data)])

    def _render(self, event: Event) -> bytes:
        if isinstance(event, TextDelta):
            self.content_started = True
            self.text_parts.append(event.text)
        elif isinstance(event, ArgsDelta):
            self.text_parts.append(event.json)
        elif isinstance(event, BlockStart) and event.kind == "tool_call":
            self.content_started = True
            self.text_parts.append(event.name)
        elif isinstance(event, MessageDelta):
            if event.usage is not None:
                self.usage = event.usage
            else:  # the client's format needs numbers: counted here, marked estimated in the ledger
                counted = Usage(input_tokens=self._input_estimate,
                                output_tokens=self._count_text("".join(self.text_parts)), estimated=True)
                event = MessageDelta(event.stop_reason, event.stop_sequence, counted)
        elif isinstance(event, MessageStop):
            self.done = True
        elif isinstance(event, StreamError):
            self.error_seen = True
        return self._renderer.render(event)


def openai_to_anthropic(*, names: dict[str, str], input_estimate: int, count_text: Callable[[str], int]) -> TranslatingTap:
    """An OpenAI-type upstream's stream, rendered for an Anthropic client."""
    return TranslatingTap(OpenAIStreamParser(), AnthropicStreamRenderer(names=names, input_estimate=input_estimate),
                          count_text=count_text, input_estimate=input_estimate)


def anthropic_to_openai(*, names: dict[str, str], client_wants_usage: bool, created: int, input_estimate: int,
                        count_text: Callable[[str], int]) -> TranslatingTap:
    """An Anthropic upstream's stream, rendered for an OpenAI client."""
    renderer = OpenAIStreamRenderer(client_wants_usage=client_wants_usage, names=names, created=created)
    return TranslatingTap(AnthropicStreamParser(), renderer, count_text=count_text, input_estimate=input_estimate)
