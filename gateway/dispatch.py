"""Upstream dispatch: retries with jittered backoff (tenacity), then the next candidate.

Everything happens before the first content byte reaches the client. A stream is opened and
read up to its first content (the preamble it holds: role chunk, message_start, ping), so an
error event or an empty stream there fails over like any other failure, invisibly. Once
content is handed back, the stream is never retried or replaced (gateway/relay.py).

At most `max_attempts` upstream calls per request, retries and fallbacks together.

| a failed attempt                                      | same model     | next candidate     | none left  |
| ----------------------------------------------------- | -------------- | ------------------ | ---------- |
| connect error, timeout, reset, 408/409/425, 429 rate  | retry, backoff | yes                | 502 / 504  |
| limit, 5xx, 529, error or empty stream before content | with jitter *  |                    |            |
| 401, 402, 403, 429 insufficient_quota (the gateway's  | no; provider's | yes (other         | 502        |
| key): the provider's breakers open                    | models out     | providers)         |            |
| context window exceeded                               | no             | larger window only | 400        |
| any other 4xx                                         | no             | no                 | its status |

* `retry-after` / `retry-after-ms` up to MAX_HONOURED_RETRY_AFTER_S is honoured; longer: no
  retry, the next candidate at once. Final failures carry `x-should-retry: false`.
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from adapters import openai as openai_adapter
from adapters.base import (
    Endpoint,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamStream,
)
from adapters.http import Timeouts, UpstreamClient, context_overflow
from adapters.stream_translate import StreamTap
from gateway import translation, upstream_errors
from gateway.audit import Attempt
from gateway.breaker import Breakers
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.parsing import ParsedRequest

PER_CANDIDATE_ATTEMPTS = 2
MAX_HONOURED_RETRY_AFTER_S = 2.0
Sleep = Callable[[float], Awaitable[None]]
Overrides = tuple[float | None, float | None, float | None, float | None]
_jitter = wait_random_exponential(multiplier=0.05, max=1.0)


@dataclass(frozen=True)
class Target:
    model: ModelConfig
    endpoint: Endpoint


@dataclass
class Dispatched:
    target: Target
    answer: UpstreamResponse | UpstreamStream
    attempts: list[Attempt] = field(default_factory=list)
    upstream_s: float = 0.0
    tap: StreamTap | None = None  # streams: the tap that read the preamble, to relay the rest
    preamble: bytes = b""  # streams: what the client gets first (held until content arrived)


class DispatchStats:
    """Retries and failovers, counted as they happen (both rare)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.retries = Counter("gateway_upstream_retries", "Attempts repeated on the same model",
                               ["model"], registry=registry)
        self.failovers = Counter("gateway_upstream_failovers", "Times a request left a model for the next candidate",
                                 ["model"], registry=registry)


@functools.lru_cache(maxsize=256)
def _endpoint_timeouts(endpoint: Endpoint) -> Timeouts:
    """`Timeouts.for_endpoint`, once per endpoint (a frozen value: a reload makes new ones)."""
    return Timeouts.for_endpoint(endpoint)


def build_request(target: Target, parsed: ParsedRequest) -> UpstreamRequest:
    if parsed.endpoint == "embeddings":
        return openai_adapter.build_embeddings_request(target.endpoint, parsed.body, target.model.upstream_model)
    if parsed.api != "openai" or target.endpoint.type == "anthropic":
        return translation.build_request(target, parsed)  # Anthropic pass-through, or across formats
    cap = None if parsed.max_output_tokens else target.model.max_output_tokens
    return openai_adapter.build_chat_request(
        target.endpoint, parsed.body, target.model.upstream_model, max_output_tokens=cap
    )


def classify(exc: UpstreamError) -> str:
    """retry | refused (the gateway's key or quota) | context | fallover | reject (the caller's fault)."""
    if exc.kind != "status":
        return "retry"  # connect, timeout, reset, an error or empty stream before content
    if exc.status in (401, 402, 403) or exc.code == "insufficient_quota":
        return "refused"
    if exc.retryable:
        return "retry"
    if context_overflow(exc)[0]:
        return "context"
    if exc.status == 404:
        return "fallover"  # the provider does not know the deployment: a config problem, not the caller's
    return "reject"


def backoff(exc: BaseException | None, attempt_number: int) -> float:
    """The wait before retry number `attempt_number` (1-based): a short retry-after, else jitter."""
    if isinstance(exc, UpstreamError) and exc.retry_after_s is not None:
        return min(exc.retry_after_s, MAX_HONOURED_RETRY_AFTER_S)
    return float(_jitter(cast(RetryCallState, _State(attempt_number))))


@dataclass
class _State:
    """What tenacity's wait strategies read of a RetryCallState (the fast path has none)."""

    attempt_number: int


def dispatch(
    client: UpstreamClient,
    targets: list[Target],
    parsed: ParsedRequest,
    *,
    max_attempts: int,
    sleep: Sleep,
    attempts: list[Attempt] | None = None,
    breakers: Breakers | None = None,
    timeouts: Overrides | None = None,
    stats: DispatchStats | None = None,
) -> Coroutine[Any, Any, Dispatched]:
    """Try the targets in order; raise a GatewayError when every one has failed.

    `attempts` (the caller's list, appended to as attempts finish) keeps the record of a
    request that fails, for its audit record, metrics and trace. `timeouts` are the route's
    overrides of the providers' (connect, first byte, idle, total)."""
    job = _Job(client, parsed, [] if attempts is None else attempts, max_attempts, sleep, breakers, timeouts, stats)
    return job.run(targets)  # the job's coroutine itself: no extra await layer on the request path


class _Job:
    """One request's dispatch: its attempts, what it learned from failures, its budget."""

    def __init__(self, client: UpstreamClient, parsed: ParsedRequest, attempts: list[Attempt], max_attempts: int,
                 sleep: Sleep, breakers: Breakers | None, overrides: Overrides | None,
                 stats: DispatchStats | None) -> None:
        self.client, self.parsed, self.attempts, self.max_attempts = client, parsed, attempts, max_attempts
        self.sleep, self.breakers, self.overrides, self.stats = sleep, breakers, overrides, stats
        self.started = time.perf_counter()
        self.last: UpstreamError | None = None
        self.inexpressible: InvalidRequest | None = None
        self.context_error: UpstreamError | None = None
        self.min_window = 0  # after a context-length error: only larger windows may be tried
        self.refused: set[str] = set()  # providers that refused the gateway's key in this request

    async def run(self, targets: list[Target]) -> Dispatched:
        skipped: list[Target] = []
        tried = False
        for i, target in enumerate(targets):
            remaining = self.max_attempts - len(self.attempts)
            if remaining <= 0:
                break
            if target.endpoint.provider in self.refused or target.model.context_window <= self.min_window:
                continue
            if self.breakers is not None and not self.breakers.admit(target.model.name):
                skipped.append(target)  # open circuit (or a half-open probe already out)
                continue
            tried = True
            tries = max(1, min(PER_CANDIDATE_ATTEMPTS, remaining - (len(targets) - i - 1)))
            result = await self._candidate(target, tries)
            if result is not None:
                return result
        if not tried and skipped and self.breakers is not None and len(self.attempts) < self.max_attempts:
            # Never every candidate open: the least recently failed one is tried anyway.
            pick = self.breakers.least_recently_failed(t.model.name for t in skipped)
            forced = next((t for t in skipped if t.model.name == pick), None)
            if forced is not None:
                self.breakers.force(forced.model.name)
                result = await self._candidate(forced, self.max_attempts - len(self.attempts))
                if result is not None:
                    return result
        raise self._final_error()

    async def _candidate(self, target: Target, tries: int) -> Dispatched | None:
        """The target's answer, or None to move on (the reason is kept for the final error)."""
        try:
            answer, tap, preamble = await self._with_retries(target, tries)
        except InvalidRequest as exc:  # this candidate's format cannot express the request; another may
            self.inexpressible = self.inexpressible or exc
            if self.breakers is not None:
                self.breakers.released(target.model.name)  # never sent: no verdict
            return None
        except UpstreamError as exc:
            self.last = exc
            action = classify(exc)
            if action == "reject":
                raise upstream_errors.rejected(exc) from None  # its status and known code, never its text
            if action == "context":  # a candidate fits only with a larger window (and the size the upstream saw)
                self.context_error = exc
                needed = context_overflow(exc)[1] or 0
                self.min_window = max(self.min_window, target.model.context_window, needed - 1)
            elif action == "refused":
                self.refused.add(target.endpoint.provider)
            if self.stats is not None:
                self.stats.failovers.labels(target.model.name).inc()
            return None
        return Dispatched(target, answer, self.attempts, time.perf_counter() - self.started, tap, preamble)

    async def _with_retries(self, target: Target, tries: int) -> tuple[Any, StreamTap | None, bytes]:
        request = build_request(target, self.parsed)
        timeouts = _endpoint_timeouts(target.endpoint)
        if self.overrides is not None:
            timeouts = timeouts.overridden(*self.overrides)
        try:  # the first attempt without building a retry engine: the common case succeeds here
            return await self._attempt(target, request, timeouts)
        except UpstreamError as exc:
            if tries <= 1 or not self._may_retry(target, exc):
                raise
            first = exc
        self._count_retry(target)
        await self.sleep(backoff(first, 1))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(tries - 1),
            wait=lambda state: backoff(state.outcome.exception() if state.outcome else None, state.attempt_number + 1),
            retry=retry_if_exception(lambda e: isinstance(e, UpstreamError) and self._may_retry(target, e)),
            before_sleep=lambda state: self._count_retry(target),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(target, request, timeouts)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _may_retry(self, target: Target, exc: UpstreamError) -> bool:
        if classify(exc) != "retry":
            return False
        if exc.retry_after_s is not None and exc.retry_after_s > MAX_HONOURED_RETRY_AFTER_S:
            return False  # a long wait: the next candidate now is better
        return self.breakers is None or self.breakers.closed(target.model.name)  # open or probing: move on

    def _count_retry(self, target: Target) -> None:
        if self.stats is not None:
            self.stats.retries.labels(target.model.name).inc()

    async def _attempt(self, target: Target, request: UpstreamRequest,
                       timeouts: Timeouts) -> tuple[Any, StreamTap | None, bytes]:
        endpoint, name = target.endpoint, target.model.name
        t0, started_ns = time.perf_counter(), time.time_ns()
        answer: UpstreamResponse | UpstreamStream
        tap: StreamTap | None = None
        preamble = b""
        try:
            if request.stream:
                answer, tap, preamble = await self._open_stream(target, request, timeouts)
            else:
                answer = await self.client.send(request, timeouts=timeouts)
        except UpstreamError as exc:
            self.attempts.append(Attempt(name, endpoint.provider, "error", exc.status,
                                         round((time.perf_counter() - t0) * 1000, 2), exc.kind, started_ns))
            self._verdict(target, exc)
            raise
        except BaseException:
            if self.breakers is not None:
                self.breakers.released(name)  # cancelled: no verdict on the deployment
            raise
        self.attempts.append(Attempt(name, endpoint.provider, "ok", answer.status,
                                     round((time.perf_counter() - t0) * 1000, 2), None, started_ns))
        if self.breakers is not None:
            self.breakers.succeeded(name)
        return answer, tap, preamble

    def _verdict(self, target: Target, exc: UpstreamError) -> None:
        if self.breakers is None:
            return
        action = classify(exc)
        if action in ("retry", "fallover"):
            self.breakers.failed(target.model.name, in_a_row=exc.status != 500)
        elif action == "refused":
            why = "quota exhausted (insufficient_quota)" if exc.code == "insufficient_quota" else \
                f"refused the gateway's key (HTTP {exc.status})"
            self.breakers.provider_refused(target.endpoint.provider, why)
        else:  # the deployment answered properly; the request was at fault
            self.breakers.succeeded(target.model.name)

    async def _open_stream(self, target: Target, request: UpstreamRequest,
                           timeouts: Timeouts) -> tuple[UpstreamStream, StreamTap, bytes]:
        """Open the stream and hold its preamble until the first content (bounded by first_byte_s)."""
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                stream = await self.client.open_stream(request, timeouts=timeouts)
                try:
                    tap = translation.stream_tap(self.parsed, target)
                    preamble = await read_preamble(stream, tap)
                except BaseException:
                    await stream.aclose()
                    raise
        except TimeoutError:
            raise UpstreamError("timeout", detail="no content before first_byte_timeout") from None
        return stream, tap, preamble

    def _final_error(self) -> Exception:
        if self.context_error is not None and self.last is self.context_error:
            return upstream_errors.context_length_exceeded()
        if self.inexpressible is not None and self.last is None:
            return self.inexpressible
        return _failed(self.last)


async def read_preamble(stream: UpstreamStream, tap: StreamTap) -> bytes:
    """Read until the first content (or a complete answer without any); what the client gets first.

    An error event, a malformed frame or a stream that ends with nothing is an UpstreamError,
    so the caller can retry or fail over before the client has seen a byte."""
    parts: list[bytes] = []
    async for chunk in stream.chunks:
        out = tap.feed(chunk)
        if tap.error_seen:
            raise UpstreamError("protocol", detail="error event or malformed frame before the first content")
        if out:
            parts.append(out)
        if tap.content_started or tap.done:
            return b"".join(parts)
    tail = tap.flush()
    if tap.error_seen or not stream_complete(tap):
        raise UpstreamError("closed", detail="the stream ended before any content")
    parts.append(tail)
    return b"".join(parts)


def stream_complete(tap: StreamTap) -> bool:
    """The upstream finished its answer: [DONE] / message_stop, or (OpenAI-compatible servers
    that close without [DONE]) a finish reason."""
    return tap.done or getattr(tap, "finish_reason", None) is not None


def _failed(exc: UpstreamError | None) -> UpstreamFailed:
    if exc is not None and exc.kind == "timeout":
        return UpstreamFailed("every candidate model timed out", status=504)
    return UpstreamFailed("every candidate model failed")
