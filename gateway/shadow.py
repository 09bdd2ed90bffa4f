"""Shadow traffic: a sampled copy of a request, sent to another model after the real answer.

The copy is never returned to the caller. The policy engine only picks a shadow model that
passes every filter for the same request facts (data class included), so a confidential
prompt is never mirrored to a vendor model. Shadow traffic never counts against the
tenant's rate limits or budgets: its cost is booked to the route's internal `account`,
and its latency, tokens and outcome go to the audit trail tagged `shadow`.

Copies run in the background with a bounded number in flight; beyond that they are
dropped (and counted), so a slow shadow model can never back up real traffic.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from prometheus_client import Counter

from adapters.base import UpstreamError, Usage
from budgets import LedgerEntry, cost, price_version
from gateway import tokens, translation
from gateway.audit import Attempt, AuditRecord
from gateway.dispatch import Target, build_request
from gateway.errors import GatewayError
from gateway.parsing import ParsedRequest

if TYPE_CHECKING:
    from gateway.relay import Exchange
    from gateway.runtime import Runtime

log = logging.getLogger("gateway.shadow")

__all__ = ["ShadowMirror"]

DEFAULT_MAX_IN_FLIGHT = 32
# Only generations are mirrored: a copy of a count_tokens (or embeddings) call would send a real,
# billed generation to the shadow model for a request that generated nothing.
MIRRORED_ENDPOINTS = frozenset({"chat.completions", "messages"})


@dataclass(frozen=True)
class _Copy:
    """What a shadow request needs from the real one, captured when it finishes."""

    request_id: str
    tenant: str | None
    key_id: str | None
    model: str
    account: str
    route: str
    data_class: str | None
    parsed: ParsedRequest


class ShadowMirror:
    def __init__(self, rt: Runtime, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self._rt = rt
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests = Counter(
            "gateway_shadow_requests", "Shadow copies by model and outcome (ok, error, dropped)",
            ["model", "outcome"], registry=rt.metrics.registry)

    def mirror(self, ex: Exchange) -> None:
        decision, parsed = ex.decision, ex.parsed
        if decision is None or decision.shadow is None or parsed is None or ex.endpoint not in MIRRORED_ENDPOINTS:
            return
        if decision.shadow not in self._rt.models:
            return
        if len(self._tasks) >= self._max or self._rt.draining:
            self._requests.labels(decision.shadow, "dropped").inc()
            return
        copy = _Copy(ex.request_id, ex.tenant, ex.key_id, decision.shadow, decision.shadow_account or "shadow",
                     decision.route_label(), ex.data_class, parsed)
        task = asyncio.get_running_loop().create_task(self._send(copy), name="shadow-copy")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let copies in flight finish (bounded), then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _send(self, copy: _Copy) -> None:
        rt = self._rt
        model = rt.models[copy.model]
        endpoint = rt.endpoints[model.provider]
        parsed = _unstreamed(copy.parsed)
        target = Target(model, endpoint)
        ts, t0 = datetime.now(UTC), time.perf_counter()
        status, outcome, usage = 200, "ok", Usage()
        error_kind: str | None = None
        try:
            request = build_request(target, parsed)
            answer = await rt.client.send(request, timeout_s=endpoint.timeout_s,
                                          connect_timeout_s=endpoint.connect_timeout_s)
            status, usage = answer.status, _usage(parsed, target, answer.body)
        except UpstreamError as exc:
            status, outcome, error_kind = exc.status or 502, "error", exc.kind
        except GatewayError as exc:  # an answer that could not be read
            status, outcome, error_kind = exc.status, "error", "unreadable"
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        spent = cost(rt.prices[copy.model], usage.input_tokens - usage.cache_write_tokens, usage.output_tokens,
                     usage.cached_input_tokens, usage.cache_write_tokens)  # as gateway.relay.usage_cost
        self._requests.labels(copy.model, outcome).inc()
        if outcome == "ok":
            rt.latency.observe(copy.model, latency_ms)
        shadow_id = f"{copy.request_id}:shadow"
        if usage.total_tokens:
            await rt.ledger.record([LedgerEntry(
                request_id=shadow_id, attempt=1, ts=ts, tenant=copy.account, key_id=None, model=copy.model,
                provider=endpoint.provider, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens, cost_usd=spent, usage_estimated=usage.estimated,
                status=outcome, price_version=price_version(rt.prices[copy.model]),
                cache_write_tokens=usage.cache_write_tokens, usage_raw=usage.raw,
            )])
        rt.audit.write(_record(copy, shadow_id, ts, endpoint.provider, status, outcome, error_kind, usage,
                               spent, latency_ms))
        if outcome != "ok":
            log.info("shadow copy failed", extra={"request_id": copy.request_id, "model": copy.model,
                                                   "error": error_kind})


def _unstreamed(parsed: ParsedRequest) -> ParsedRequest:
    """The same request as one JSON answer: a shadow's answer is only measured, never relayed."""
    if not parsed.stream:
        return parsed
    body = {k: v for k, v in parsed.body.items() if k not in ("stream", "stream_options")}
    return replace(parsed, body=body, stream=False, client_wants_usage=False)


def _usage(parsed: ParsedRequest, target: Target, raw: bytes) -> Usage:
    """Usage as the upstream reported it (either API format), else counted from the text."""
    def counted(text: str) -> Usage:
        return Usage(input_tokens=parsed.input_tokens, output_tokens=tokens.count_text(text), estimated=True)

    _, usage, _ = translation.json_answer(parsed, target, raw, counted)
    return usage


def _record(copy: _Copy, shadow_id: str, ts: datetime, provider: str, status: int, outcome: str,
            error_kind: str | None, usage: Usage, spent: Decimal, latency_ms: float) -> AuditRecord:
    parsed = copy.parsed
    return AuditRecord(
        request_id=shadow_id, ts=ts.isoformat(), tenant=copy.tenant, key_id=copy.key_id, api=parsed.api,
        endpoint=parsed.endpoint, route=copy.route, model_requested=parsed.model[:128], model_served=copy.model,
        provider=provider, data_class=copy.data_class, stream=False, status=status, outcome=outcome,
        error_code="upstream_error" if outcome != "ok" else None,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens, estimated_input_tokens=parsed.input_tokens,
        usage_estimated=usage.estimated, cost_usd=str(spent), latency_ms=latency_ms,
        attempts=[Attempt(copy.model, provider, outcome, status, latency_ms, error_kind)],
        features={"shadow": True, "shadow_of": copy.request_id, "account": copy.account},
    )
