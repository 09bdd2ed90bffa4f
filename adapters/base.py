"""Types every adapter shares: endpoints, upstream requests/answers, usage, errors."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one provider; the key is read from the environment by the caller."""

    provider: str
    type: str
    base_url: str
    api_key: str | None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    # Unset: `timeout_s`. See adapters/http.py `Timeouts` for what each one bounds.
    first_byte_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    total_timeout_s: float | None = None


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool


@dataclass
class Usage:
    """Token usage of one upstream call, normalised: input excludes cached input.

    `input_tokens` is every input token not read from a cache (OpenAI `prompt_tokens` minus
    cached; Anthropic `input_tokens` plus cache writes); `cache_write_tokens` is the part of
    it written to a cache, priced at the cache-write rate where the model has one.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    estimated: bool = False
    raw: dict[str, Any] | None = None
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.output_tokens


ErrorKind = Literal["connect", "timeout", "status", "protocol", "closed"]


class UpstreamError(Exception):
    """An upstream call failed. `detail` is for logs only and never reaches a client."""

    def __init__(
        self,
        kind: ErrorKind,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        detail: str = "",
        code: str | None = None,
    ) -> None:
        super().__init__(f"upstream {kind}" + (f" {status}" if status else ""))
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        self.detail = detail
        self.code = code

    @property
    def retryable(self) -> bool:
        if self.kind in ("connect", "timeout", "closed"):
            return True
        if self.kind == "status" and self.status in RETRYABLE_STATUS:
            return self.code != "insufficient_quota"
        return False


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class UpstreamStream:
    """An open upstream stream: headers are in, chunks arrive as the upstream sends them."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]
    _closers: list[Any] = field(default_factory=list)

    async def aclose(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    def abort(self) -> None:
        """End the stream now (e.g. at the shutdown deadline): a pending or later read raises UpstreamError."""
        abort = getattr(self.chunks, "abort", None)
        if abort is not None:
            abort()
