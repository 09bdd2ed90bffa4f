"""The tail of the request path: render the answer, settle usage, write the audit record.

`Exchange` carries one request's state from the edge to the audit record. `finish_exchange`
is the single place where a reservation is settled or released and the audit row written,
whatever happened (success, error, client disconnect, shutdown).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.responses import Response

from adapters.base import UpstreamError, UpstreamResponse, UpstreamStream, Usage
from adapters.http import ABORTED
from adapters.sse_openai import DONE
from adapters.stream_translate import StreamTap
from budgets import LedgerEntry, Price, Reservation, cost, price_version
from gateway import stores, tokens, translation
from gateway.audit import Attempt, AuditRecord
from gateway.datarisk import DataClassVerdict, user_hash
from gateway.dispatch import Dispatched, Target, stream_complete
from gateway.errors import GatewayError, render_error
from gateway.parsing import ParsedRequest
from gateway.runtime import Runtime
from gateway.streaming import DisconnectWatch, RelayResponse
from routing_policies import Decision

log = logging.getLogger("gateway.request")


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str
    started: float
    ts: datetime
    tenant: str | None = None
    key_id: str | None = None
    parsed: ParsedRequest | None = None
    decision: Decision | None = None
    data_class: str | None = None
    target: Target | None = None
    attempts: list[Attempt] = field(default_factory=list)
    reservation: Reservation | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    admitted_tokens: int = 0
    tokens_window_end: float | None = None  # the rate-limit token window admitted_tokens went to
    upstream_started: float | None = None
    upstream_s: float = 0.0
    overhead_ms: float | None = None
    ttft_ms: float | None = None
    finished: bool = False
    risk: DataClassVerdict | None = None
    span: Any = None  # the request's trace span (gateway/telemetry.py); None when tracing is off
    trace_id: str | None = None
    stages: list[tuple[str, int, int]] = field(default_factory=list)  # (stage, start_ns, end_ns), traced only
    slot: bool = False  # holds a capacity slot (gateway/shedding.py) until finished
    watch: DisconnectWatch | None = None  # streams: cancels the request when the client leaves
    # The client's x-request-id: echoed and audited, never a ledger key (`request_id` is the gateway's own).
    client_request_id: str | None = None
    sticky_user: str | None = None  # the end user's pseudonym (datarisk.user_hash), once decide() has it

    @classmethod
    def begin(cls, request_id: str, endpoint: str, client_request_id: str | None = None) -> Exchange:
        return cls(request_id, endpoint, time.perf_counter(), datetime.now(UTC), client_request_id=client_request_id)

    def note_request(self, parsed: ParsedRequest) -> None:
        self.parsed = parsed

    def note_decision(self, decision: Decision, data_class: str) -> None:
        self.decision, self.data_class = decision, data_class

    def mark_upstream_start(self) -> None:
        self.upstream_started = time.perf_counter()

    def note_dispatched(self, result: Dispatched) -> None:
        self.target, self.attempts, self.upstream_s = result.target, result.attempts, result.upstream_s

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def response_headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.client_request_id or self.request_id,
                   "x-gateway-request-id": self.request_id, **self.rate_headers}
        if self.decision is not None:
            headers["x-gateway-route"] = self.decision.route_label()
        if self.target is not None:
            headers["x-gateway-model"] = self.target.model.name
            headers["x-gateway-provider"] = self.target.endpoint.provider
        headers["x-gateway-attempts"] = str(len(self.attempts))
        self.overhead_ms = round(self.elapsed_ms() - self.upstream_s * 1000, 3)
        headers["x-gateway-overhead-ms"] = f"{self.overhead_ms:.3f}"
        return headers


async def render_json(rt: Runtime, ex: Exchange, answer: UpstreamResponse) -> Response:
    """A non-streamed answer: forwarded as is (or translated for the client); usage is read from it."""
    assert ex.parsed is not None and ex.target is not None
    try:
        body, usage, produced = translation.json_answer(ex.parsed, ex.target, answer.body,
                                                        lambda t: _counted_usage(ex, t))
    except GatewayError as exc:  # an answer that cannot be translated for this client
        await finish_exchange(rt, ex, error=exc)
        return render_error(exc, "anthropic" if ex.parsed.api == "anthropic" else "openai", ex.response_headers())
    headers = ex.response_headers()
    completion = produced() if rt.audit.log_bodies else None
    await finish_exchange(rt, ex, error=None, usage=usage, status=answer.status, completion=completion)
    return json_response(body, answer.status, headers)


class _JsonAnswer(Response):
    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.body, self.status_code, self.raw_headers = body, status_code, raw_headers
        self.background = None


@functools.lru_cache(maxsize=256)
def _header_name(name: str) -> bytes:
    return name.lower().encode("latin-1")


def json_response(body: bytes, status: int, headers: dict[str, str]) -> Response:
    """A JSON answer with the gateway's headers: Starlette's Response, its raw headers built
    here (header names are a small fixed set, encoded once), not lowered and encoded per request."""
    raw = [(_header_name(name), value.encode("latin-1")) for name, value in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    raw.append((b"content-type", b"application/json"))
    return _JsonAnswer(body, status, raw)


def relay_response(rt: Runtime, ex: Exchange, stream: UpstreamStream, tap: StreamTap | None = None,
                   preamble: bytes = b"") -> RelayResponse:
    """The client's stream: `preamble` (what dispatch held until the first content) then the rest."""
    assert ex.parsed is not None and ex.target is not None
    if tap is None:
        tap = translation.stream_tap(ex.parsed, ex.target)
    headers = ex.response_headers()
    headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
    return RelayResponse(_relay(rt, ex, stream, tap, preamble), status_code=stream.status, headers=headers,
                         watch=ex.watch, on_unstarted=functools.partial(_abandoned, rt, ex, stream, tap))


async def _relay(rt: Runtime, ex: Exchange, stream: UpstreamStream, tap: StreamTap,
                 preamble: bytes) -> AsyncIterator[bytes]:
    """Relay an opened stream. Content has reached the client once this yields, so there is no
    second stream: a failure (cut, stall, error event, malformed frame, shutdown deadline) ends
    it with an in-band error frame and no [DONE] / message_stop, and the SDK raises. The stream
    ends as soon as the upstream's [DONE] / message_stop arrives, not when its connection closes."""
    api = ex.parsed.api if ex.parsed else "openai"
    outcome = "stream_interrupted"
    key = id(stream)
    rt.open_streams[key] = stream  # cut with an in-band error at the shutdown deadline
    try:
        if preamble:
            if tap.content_started:
                ex.ttft_ms = round(ex.elapsed_ms(), 3)
            yield preamble
        if not (tap.done or tap.error_seen):
            async for chunk in stream.chunks:
                out = tap.feed(chunk)
                if out:
                    if ex.ttft_ms is None and tap.content_started:
                        ex.ttft_ms = round(ex.elapsed_ms(), 3)
                    yield out
                if tap.done or tap.error_seen:
                    break
            else:
                tail = tap.flush()
                if tail:
                    yield tail
        if stream_complete(tap) and not tap.error_seen:
            outcome = "ok"
            if not tap.done and api == "openai" and not getattr(tap, "renders_errors", False):
                yield DONE  # an OpenAI-compatible server that closed after its finish reason
        else:
            _stream_failed(rt, ex, "error event" if tap.error_seen else "ended early")
            if not (tap.error_seen and getattr(tap, "renders_errors", False)):
                yield translation.stream_error(api, getattr(tap, "error_kind", "api_error"))
    except UpstreamError as exc:
        if exc.detail == ABORTED:
            outcome = "drain_deadline"
        else:
            _stream_failed(rt, ex, exc.kind)
        yield translation.stream_error(api)
    except BaseException:
        # A client that hangs up after the final [DONE] got the whole answer.
        outcome = "ok" if tap.done and not tap.error_seen else "client_disconnected"
        raise
    finally:
        rt.open_streams.pop(key, None)
        await stream.aclose()
        usage = tap.usage or _counted_usage(ex, "".join(tap.text_parts))
        completion = "".join(tap.text_parts) if rt.audit.log_bodies else None
        await finish_exchange(rt, ex, error=None, usage=usage, status=stream.status, outcome=outcome,
                              completion=completion)
        rt.leave()


async def _abandoned(rt: Runtime, ex: Exchange, stream: UpstreamStream, tap: StreamTap) -> None:
    """The client was gone before its stream began, so `_relay` (and its finally) never ran: end it here."""
    if ex.finished:
        return
    await stream.aclose()
    usage = tap.usage or _counted_usage(ex, "".join(tap.text_parts))  # the preamble was read from the upstream
    await finish_exchange(rt, ex, error=None, usage=usage, status=499, outcome="client_disconnected")
    rt.leave()


def _stream_failed(rt: Runtime, ex: Exchange, why: str) -> None:
    """After its first content a stream failed: the deployment's breaker hears of it."""
    log.warning("upstream stream failed", extra={"request_id": ex.request_id, "error": why})
    if ex.target is not None:
        rt.breakers.failed(ex.target.model.name)


def _counted_usage(ex: Exchange, produced_text: str) -> Usage:
    """Usage counted by the gateway when the upstream reported none."""
    counted_in = ex.parsed.input_tokens if ex.parsed else 0
    return Usage(input_tokens=counted_in, output_tokens=tokens.count_text(produced_text), estimated=True)


def usage_cost(price: Price, usage: Usage) -> Decimal:
    """Cost of normalised usage: cache reads and cache writes at their own prices where set."""
    return cost(price, usage.input_tokens - usage.cache_write_tokens, usage.output_tokens,
                usage.cached_input_tokens, usage.cache_write_tokens)


async def finish_exchange(
    rt: Runtime,
    ex: Exchange,
    *,
    error: GatewayError | None,
    usage: Usage | None = None,
    status: int = 200,
    outcome: str = "ok",
    crashed: bool = False,
    completion: str | None = None,
) -> None:
    """Settle or release the reservation, count metrics, write the audit record. Runs once."""
    if ex.finished:
        return
    ex.finished = True
    if ex.slot:
        ex.slot = False
        rt.shedder.release()
    usage = usage or Usage()
    model = ex.target.model.name if ex.target else None
    spent = usage_cost(rt.prices[model], usage) if model else Decimal(0)
    if error is not None:
        status, outcome = error.status, "error"
    elif crashed:
        status, outcome = 500, "error"
    await _settle(rt, ex, usage, spent, status, outcome)
    _count(rt, ex, usage, spent, status)
    record = _audit_record(ex, usage, spent, status, outcome, error)
    if rt.audit.log_bodies:  # redacted in the audit writer's thread, never stored raw
        record.request_body, record.response_text = (ex.parsed.body if ex.parsed else None), completion
    rt.audit.write(record)
    if ex.span is not None:
        rt.telemetry.finish(ex, usage, status, outcome, error)
    if outcome == "ok" and status < 400:
        rt.latency.observe_exchange(ex)
        if ex.decision is not None and ex.decision.shadow is not None:
            rt.shadow.mirror(ex)  # after the real answer; runs in the background


async def _settle(rt: Runtime, ex: Exchange, usage: Usage, spent: Decimal, status: int, outcome: str) -> None:
    entries = []
    if ex.target is not None and ex.tenant is not None:
        entries.append(LedgerEntry(
            request_id=ex.request_id, attempt=len(ex.attempts), ts=ex.ts, tenant=ex.tenant, key_id=ex.key_id,
            model=ex.target.model.name, provider=ex.target.endpoint.provider,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens, cost_usd=spent,
            usage_estimated=usage.estimated, status=outcome,
            price_version=price_version(rt.prices[ex.target.model.name]),
            cache_write_tokens=usage.cache_write_tokens, usage_raw=usage.raw,
        ))
    if ex.reservation is not None:
        if entries:
            await rt.ledger.settle(ex.reservation, entries)
        else:
            await rt.ledger.release(ex.reservation)
    elif entries:
        await rt.ledger.record(entries)
    if ex.tenant and ex.admitted_tokens and usage.total_tokens != ex.admitted_tokens:
        # Tokens per minute: the estimate counted at admission becomes the actual usage.
        await stores.correct_rate_tokens(rt.limiter, f"tenant:{ex.tenant}", rt.tenants[ex.tenant].rate_limits,
                                         usage.total_tokens - ex.admitted_tokens, ex.tokens_window_end)
    rt.alerts.after_settle(ex.tenant)


def _count(rt: Runtime, ex: Exchange, usage: Usage, spent: Decimal, status: int) -> None:
    decision, target = ex.decision, ex.target
    fallback = None
    if target is not None and decision is not None and decision.candidates and target.model.name != decision.candidates[0]:
        fallback = f"{decision.policy}:{decision.route}"  # no version: bounded
    rt.metrics.tally.add(
        ex.tenant or "-", target.model.name if target else "-", f"{status // 100}xx",
        f"{decision.policy}:{decision.route}" if decision else "-", target.endpoint.provider if target else "-",
        ex.elapsed_ms() / 1000, None if ex.overhead_ms is None else ex.overhead_ms / 1000,
        None if ex.ttft_ms is None else ex.ttft_ms / 1000,
        (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) if target is not None else None,
        float(spent), fallback, [(a.provider, a.model, a.outcome) for a in ex.attempts])


def _audit_record(ex: Exchange, usage: Usage, spent: Decimal, status: int, outcome: str,
                  error: GatewayError | None) -> AuditRecord:
    parsed = ex.parsed
    return AuditRecord(
        request_id=ex.request_id,
        client_request_id=ex.client_request_id,
        ts=ex.ts.isoformat(),
        tenant=ex.tenant,
        key_id=ex.key_id,
        api=parsed.api if parsed else "openai",
        endpoint=ex.endpoint,
        route=ex.decision.route_label() if ex.decision else None,
        policy_version=ex.decision.version if ex.decision else None,
        trace_id=ex.trace_id,
        model_requested=parsed.model[:128] if parsed else None,
        model_served=ex.target.model.name if ex.target else None,
        provider=ex.target.endpoint.provider if ex.target else None,
        data_class=ex.data_class,
        stream=parsed.stream if parsed else False,
        status=status,
        outcome=outcome,
        error_code=error.code if error else None,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        usage_raw=usage.raw,
        estimated_input_tokens=parsed.input_tokens if parsed else 0,
        usage_estimated=usage.estimated,
        cost_usd=str(spent),
        latency_ms=round(ex.elapsed_ms(), 3),
        ttft_ms=ex.ttft_ms,
        overhead_ms=ex.overhead_ms,
        attempts=list(ex.attempts),
        features=_features(ex),
    )


def _features(ex: Exchange) -> dict[str, Any]:
    """What routing used, so a policy change can be replayed without the prompt."""
    parsed = ex.parsed
    if parsed is None:
        return {}
    features: dict[str, Any] = {
        "capabilities": sorted(parsed.capabilities),
        "input_tokens_bound": parsed.input_tokens_bound,
        "max_output_tokens": parsed.max_output_tokens,
        "candidates": list(ex.decision.candidates) if ex.decision else [],
        "rejected": [[r.model, r.reason] for r in ex.decision.rejected] if ex.decision else [],
    }
    if ex.decision is not None:
        features["decision"] = ex.decision.reason
        features["shadow_model"] = ex.decision.shadow
    if ex.risk is not None:  # why the data class is what it is: detector kinds only, never text
        features.update(ex.risk.audit_features())
    # a pseudonym, so splits replay the same way (decide() computed it for the policy)
    features["sticky_user"] = ex.sticky_user if ex.sticky_user is not None else user_hash(parsed.body)
    return features
