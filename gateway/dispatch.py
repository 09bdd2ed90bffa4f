"""Upstream dispatch: retries with jittered backoff (tenacity), then the next candidate.

Everything happens before the first byte reaches the client: once a stream is open
and handed back, it is never retried or replaced.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from adapters import openai as openai_adapter
from adapters.base import Endpoint, UpstreamError, UpstreamRequest, UpstreamResponse, UpstreamStream
from adapters.http import UpstreamClient
from gateway.audit import Attempt
from gateway.config import ModelConfig
from gateway import translation
from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamRejected
from gateway.parsing import ParsedRequest

PER_CANDIDATE_ATTEMPTS = 2
MAX_HONOURED_RETRY_AFTER_S = 2.0
Sleep = Callable[[float], Awaitable[None]]


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


def build_request(target: Target, parsed: ParsedRequest) -> UpstreamRequest:
    if parsed.endpoint == "embeddings":
        return openai_adapter.build_embeddings_request(target.endpoint, parsed.body, target.model.upstream_model)
    if parsed.api != "openai" or target.endpoint.type == "anthropic":
        return translation.build_request(target, parsed)  # Anthropic pass-through, or across formats
    cap = None if parsed.max_output_tokens else target.model.max_output_tokens
    return openai_adapter.build_chat_request(
        target.endpoint, parsed.body, target.model.upstream_model, max_output_tokens=cap
    )


def _falls_over(exc: UpstreamError) -> bool:
    """Whether the next candidate may be tried after this failure (vs. answering the client)."""
    if exc.retryable:
        return True
    return exc.kind == "status" and exc.status in (401, 402, 403, 404)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, UpstreamError) and exc.retry_after_s is not None:
        return min(exc.retry_after_s, MAX_HONOURED_RETRY_AFTER_S)
    return float(wait_random_exponential(multiplier=0.05, max=1.0)(state))


async def dispatch(
    client: UpstreamClient,
    targets: list[Target],
    parsed: ParsedRequest,
    *,
    max_attempts: int,
    sleep: Sleep,
    attempts: list[Attempt] | None = None,
) -> Dispatched:
    """Try the targets in order; raise a GatewayError when every one has failed.

    `attempts` (the caller's list, appended to as attempts finish) keeps the record of a
    request that fails, for its audit record, metrics and trace."""
    attempts = [] if attempts is None else attempts
    started = time.perf_counter()
    last: UpstreamError | None = None
    inexpressible: InvalidRequest | None = None
    for target in targets:
        remaining = max_attempts - len(attempts)
        if remaining <= 0:
            break
        try:
            answer = await _with_retries(client, target, parsed, attempts, min(PER_CANDIDATE_ATTEMPTS, remaining), sleep)
        except UpstreamError as exc:
            last = exc
            if not _falls_over(exc):
                raise _rejected(exc) from None
            continue
        except InvalidRequest as exc:  # this candidate's format cannot express the request; another may
            inexpressible = inexpressible or exc
            continue
        return Dispatched(target, answer, attempts, time.perf_counter() - started)
    if inexpressible is not None and last is None:
        raise inexpressible
    raise _failed(last)


async def _with_retries(
    client: UpstreamClient, target: Target, parsed: ParsedRequest, attempts: list[Attempt], tries: int, sleep: Sleep
) -> UpstreamResponse | UpstreamStream:
    request = build_request(target, parsed)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(tries),
        wait=_wait,
        retry=retry_if_exception(lambda e: isinstance(e, UpstreamError) and e.retryable),
        sleep=sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await _attempt(client, target, request, attempts)
    raise AssertionError("unreachable: tenacity either returns or reraises")


async def _attempt(
    client: UpstreamClient, target: Target, request: UpstreamRequest, attempts: list[Attempt]
) -> UpstreamResponse | UpstreamStream:
    endpoint = target.endpoint
    t0, started_ns = time.perf_counter(), time.time_ns()
    try:
        answer: Any
        if request.stream:
            answer = await client.open_stream(request, timeout_s=endpoint.timeout_s, connect_timeout_s=endpoint.connect_timeout_s)
        else:
            answer = await client.send(request, timeout_s=endpoint.timeout_s, connect_timeout_s=endpoint.connect_timeout_s)
    except UpstreamError as exc:
        attempts.append(Attempt(target.model.name, endpoint.provider, "error", exc.status,
                                round((time.perf_counter() - t0) * 1000, 2), exc.kind, started_ns))
        raise
    attempts.append(Attempt(target.model.name, endpoint.provider, "ok", answer.status,
                            round((time.perf_counter() - t0) * 1000, 2), None, started_ns))
    return answer  # type: ignore[no-any-return]


def _rejected(exc: UpstreamError) -> UpstreamRejected:
    code = f" ({exc.code})" if exc.code and exc.code.replace("_", "").isalnum() else ""
    return UpstreamRejected(f"the upstream model rejected the request{code}", status=exc.status or 400)


def _failed(exc: UpstreamError | None) -> UpstreamFailed:
    if exc is not None and exc.kind == "timeout":
        return UpstreamFailed("every candidate model timed out", status=504)
    return UpstreamFailed("every candidate model failed")
