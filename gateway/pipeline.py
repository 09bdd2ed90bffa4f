"""The request path, read top to bottom.

read body -> authenticate -> parse -> rate limit -> policy decision (pure)
-> reserve budget -> dispatch (retries, fallback) -> settle/release (in `finally`)
-> audit -> render (JSON or SSE).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

from starlette.requests import Request
from starlette.responses import Response

from adapters.base import UpstreamStream
from budgets import BudgetExceeded, cost
from gateway.dispatch import Target, dispatch
from gateway.errors import (
    BudgetExhausted, GatewayError, InvalidApiKey, ModelNotAllowed, ModelNotFound, RateLimited,
    ServiceUnavailable, render_error,
)
from gateway.keys import KeyRecord
from gateway.parsing import ParsedRequest, read_body
from gateway.relay import Exchange, finish_exchange, relay_response, render_json

__all__ = ["Exchange", "authenticate", "handle", "request_id", "presented_key"]
from gateway.runtime import Runtime, TenantRuntime
from routing_policies import Decision, Facts, choose, max_data_class

Parser = Callable[[bytes], ParsedRequest]


async def handle(rt: Runtime, request: Request, parse: Parser, endpoint: str) -> Response:
    """Serve one proxied request; every outcome is audited and every reservation settled."""
    ex = Exchange.begin(request_id(rt, request), endpoint)
    rt.enter()
    try:
        if rt.draining:
            raise ServiceUnavailable("the gateway is shutting down", headers={"retry-after": "1"})
        raw = await read_body(request, rt.loaded.config.server.max_body_bytes)
        key, tenant = await authenticate(rt, request, ex)
        parsed = parse(raw)
        ex.note_request(parsed)
        await rate_limit(rt, tenant, key, parsed, ex)
        decision = decide(rt, tenant, key, parsed, request, ex)
        targets = [Target(rt.models[name], rt.endpoints[rt.models[name].provider]) for name in decision.candidates]
        await reserve(rt, tenant, parsed, targets, ex)
        ex.mark_upstream_start()
        result = await dispatch(
            rt.client, targets, parsed, max_attempts=decision_max_attempts(rt, decision), sleep=rt.sleep
        )
    except GatewayError as exc:
        await finish_exchange(rt, ex, error=exc)
        rt.leave()
        return render_error(exc, "openai", ex.response_headers())
    except BaseException:
        await finish_exchange(rt, ex, error=None, crashed=True)
        rt.leave()
        raise
    ex.note_dispatched(result)
    if isinstance(result.answer, UpstreamStream):
        return relay_response(rt, ex, result.answer)  # settles, audits and leaves when the stream ends
    try:
        return await render_json(rt, ex, result.answer)
    finally:
        rt.leave()


async def authenticate(rt: Runtime, request: Request, ex: Exchange) -> tuple[KeyRecord, TenantRuntime]:
    presented = presented_key(request)
    if not presented:
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
    key = await rt.keys.authenticate(presented, datetime.now(UTC))
    tenant = rt.tenants.get(key.tenant) if key else None
    if key is None or tenant is None:
        raise InvalidApiKey("invalid API key")
    ex.tenant, ex.key_id = tenant.config.id, key.id
    return key, tenant


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


async def rate_limit(rt: Runtime, tenant: TenantRuntime, key: KeyRecord, parsed: ParsedRequest, ex: Exchange) -> None:
    limits = tenant.rate_limits
    if limits.requests_per_minute is None and limits.tokens_per_minute is None:
        return
    admitted = parsed.input_tokens_bound + (parsed.max_output_tokens or 0)
    state = await rt.limiter.hit(f"tenant:{tenant.config.id}", limits, admitted)
    ex.rate_headers = state.headers()
    ex.admitted_tokens = admitted
    if not state.allowed:
        rt.metrics.rejections.labels(tenant.config.id, "rate_limit").inc()
        raise RateLimited(
            "rate limit exceeded for this tenant; retry after the window resets",
            headers={"retry-after": str(state.retry_after_s or 1)},
        )


def decide(rt: Runtime, tenant: TenantRuntime, key: KeyRecord, parsed: ParsedRequest, request: Request,
           ex: Exchange) -> Decision:
    policy = rt.policies[tenant.config.policy]
    facts = Facts(
        tenant=tenant.config.id,
        requested_model=parsed.model,
        data_class=_data_class(tenant, request),
        input_tokens=parsed.input_tokens_bound,
        max_output_tokens=parsed.max_output_tokens,
        capabilities=parsed.capabilities,
        allowed_models=tuple(tenant.config.allowed_models),
        sticky_key=key.id,
    )
    decision = choose(facts, rt.catalog, policy, rt.rng)
    ex.note_decision(decision, facts.data_class)
    if decision.outcome == "model_not_found":
        raise ModelNotFound(f"model '{_printable(parsed.model)}' does not exist", param="model")
    if decision.outcome != "ok" or not decision.candidates:
        raise ModelNotAllowed(f"model '{_printable(parsed.model)}' is not allowed for this tenant", param="model")
    # The allow-list applies to what is actually dispatched, whatever the policy says.
    allowed = tenant.config.allowed_models
    if not all(any(fnmatch.fnmatchcase(name, glob) for glob in allowed) for name in decision.candidates):
        raise ModelNotAllowed("the routed model is not allowed for this tenant", param="model")
    return decision


def _data_class(tenant: TenantRuntime, request: Request) -> str:
    asked = request.headers.get("x-gateway-data-class")
    if asked in ("public", "internal", "confidential", "restricted"):
        return max_data_class(tenant.config.data_class, asked)
    return tenant.config.data_class


def _printable(name: str) -> str:
    return "".join(ch for ch in name[:128] if ch.isprintable())


async def reserve(rt: Runtime, tenant: TenantRuntime, parsed: ParsedRequest, targets: list[Target],
                  ex: Exchange) -> None:
    """Reserve the worst case over every candidate, so no fallback can overshoot."""
    if not tenant.budget_limits:
        return
    worst_tokens, worst_usd = 0, Decimal(0)
    for target in targets:
        out = parsed.max_output_tokens if parsed.max_output_tokens is not None else target.model.max_output_tokens
        worst_tokens = max(worst_tokens, parsed.input_tokens_bound + out)
        worst_usd = max(worst_usd, cost(rt.prices[target.model.name], parsed.input_tokens_bound, out))
    try:
        ex.reservation = await rt.ledger.reserve(
            tenant.config.id, tenant.budget_limits, worst_tokens, worst_usd, datetime.now(UTC)
        )
    except BudgetExceeded as exc:
        rt.metrics.rejections.labels(tenant.config.id, "budget").inc()
        raise BudgetExhausted(f"budget exhausted: {exc}") from None


def decision_max_attempts(rt: Runtime, decision: Decision) -> int:
    policy = rt.policies[decision.policy]
    for route in policy.file.routes:
        if route.name == decision.route:
            return route.max_attempts
    return 3


def request_id(rt: Runtime, request: Request) -> str:
    """The client's x-request-id when it is sane, else a new unique one."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return rt.new_request_id()

