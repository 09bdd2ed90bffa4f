"""The request path, read top to bottom.

read body -> authenticate -> parse -> rate limit -> policy decision (pure)
-> reserve budget -> dispatch (retries, fallback) -> settle/release (in `finally`)
-> audit -> render (JSON or SSE).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal

from starlette.requests import Request
from starlette.responses import Response

from adapters.base import UpstreamStream
from budgets import Balance, BudgetExceeded, RequestRef, StoreUnavailable, cost
from gateway import stores
from gateway.datarisk import HEADER as DATA_CLASS_HEADER
from gateway.datarisk import classify, user_hash
from gateway.dispatch import Target, dispatch
from gateway.errors import (
    ApiFormat,
    BudgetExhausted,
    GatewayError,
    InvalidApiKey,
    ModelNotAllowed,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    render_error,
)
from gateway.keys import KeyRecord
from gateway.parsing import ParsedRequest, read_body
from gateway.relay import Exchange, finish_exchange, relay_response, render_json
from gateway.runtime import Runtime, TenantRuntime
from gateway.streaming import AnyResponse, DisconnectWatch
from gateway.telemetry import mark, stage_start
from routing_policies import Decision, Facts, choose

__all__ = ["Exchange", "authenticate", "client_request_id", "handle", "presented_key", "request_id"]

Parser = Callable[[bytes], ParsedRequest]


async def handle(
    rt: Runtime, request: Request, parse: Parser, endpoint: str, api: ApiFormat = "openai"
) -> AnyResponse:
    """Serve one proxied request; every outcome is audited and every reservation settled.

    `api` is the caller's format (the route's), used for errors raised before the body is parsed.
    """
    # The ledger key is always the gateway's own id: a client reusing one x-request-id must not
    # make its requests' rows collide (and be dropped as replays). The client's id is echoed.
    ex = Exchange.begin(rt.new_request_id(), endpoint, client_request_id(request))
    rt.telemetry.begin(ex, request.headers)
    rt.enter()
    try:
        if rt.draining:
            raise ServiceUnavailable("the gateway is shutting down", headers={"retry-after": "1"})
        if not rt.shedder.try_acquire():  # at capacity: queue (bounded) or refuse fast (gateway/shedding.py)
            await rt.shedder.acquire(api)
        ex.slot = True
        raw = await read_body(request, rt.loaded.config.server.max_body_bytes)
        key, tenant = await authenticate(rt, request, ex)
        stores.ensure_available(rt.ledger)
        parsed = parse(raw)
        ex.note_request(parsed)
        if parsed.stream:  # from here to the last byte, a client that leaves cancels the upstream call
            ex.watch = DisconnectWatch(request.receive)
        t0 = stage_start()
        await rate_limit(rt, tenant, key, parsed, ex)
        mark(ex, "ratelimit", t0)
        t0 = stage_start()
        budget_left = await read_balance(rt, tenant)
        mark(ex, "budget.balance", t0)
        t0 = stage_start()
        decision = decide(rt, tenant, key, parsed, request, ex, budget_left)
        mark(ex, "policy", t0)
        targets = [Target(rt.models[name], rt.endpoints[rt.models[name].provider]) for name in decision.candidates]
        t0 = stage_start()
        await reserve(rt, tenant, parsed, targets, ex)
        mark(ex, "budget.reserve", t0)
        ex.mark_upstream_start()
        # Non-streamed: a client leaving after the upstream call has run a while cancels it (gateway/streaming.py).
        result = await rt.slow_calls.during(ex, request.receive, dispatch(
            rt.client, targets, parsed, max_attempts=decision_max_attempts(rt, decision), sleep=rt.sleep,
            attempts=ex.attempts, breakers=rt.breakers, timeouts=decision.timeouts, stats=rt.dispatch_stats,
        ))
    except (GatewayError, StoreUnavailable) as caught:
        if ex.watch is not None:
            ex.watch.stop()
        exc = stores.fail_closed(caught)  # a store outage is a 503, never an unmetered request
        await finish_exchange(rt, ex, error=exc)
        rt.leave()
        return render_error(exc, api, ex.response_headers())
    except BaseException:
        if ex.watch is not None:
            ex.watch.stop()
            if ex.watch.absorb():  # the client left before its stream began: the upstream call is cancelled
                await finish_exchange(rt, ex, error=None, status=499, outcome="client_disconnected")
                rt.leave()
                return Response(status_code=499)
        await finish_exchange(rt, ex, error=None, crashed=True)
        rt.leave()
        raise
    ex.note_dispatched(result)
    if isinstance(result.answer, UpstreamStream):
        # settles, audits and leaves when the stream ends
        return relay_response(rt, ex, result.answer, result.tap, result.preamble)
    try:
        return await render_json(rt, ex, result.answer)
    except BaseException:  # never an unsettled reservation, an unaudited request or a held slot
        await finish_exchange(rt, ex, error=None, crashed=True)
        raise
    finally:
        if ex.watch is not None:
            ex.watch.stop()
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
    admitted = parsed.input_tokens_bound + (parsed.max_output_tokens or 0) * parsed.choices
    state = await rt.limiter.hit(f"tenant:{tenant.config.id}", limits, admitted)
    ex.rate_headers = state.headers()
    ex.admitted_tokens, ex.tokens_window_end = admitted, state.tokens_window_end
    if not state.allowed:
        rt.metrics.rejections.labels(tenant.config.id, "rate_limit").inc()
        raise RateLimited(
            "rate limit exceeded for this tenant; retry after the window resets",
            headers={"retry-after": str(state.retry_after_s or 1)},
        )


async def read_balance(rt: Runtime, tenant: TenantRuntime) -> tuple[Decimal | None, int | None]:
    """What the tenant has left (USD, tokens) in its tightest window: candidates that cannot fit are skipped."""
    if not tenant.budget_limits:
        return None, None
    # fresh=False: a routing hint may lag the last settles by a flush; `reserve` is exact.
    return remaining_budget(await rt.ledger.balance(tenant.config.id, tenant.budget_limits, datetime.now(UTC),
                                                    fresh=False))


def remaining_budget(balances: Iterable[Balance]) -> tuple[Decimal | None, int | None]:
    usd = [b.remaining_usd for b in balances if b.remaining_usd is not None]
    tokens = [b.remaining_tokens for b in balances if b.remaining_tokens is not None]
    return (min(usd) if usd else None), (min(tokens) if tokens else None)


def decide(rt: Runtime, tenant: TenantRuntime, key: KeyRecord, parsed: ParsedRequest, request: Request,
           ex: Exchange, budget_left: tuple[Decimal | None, int | None] = (None, None)) -> Decision:
    # One read of the policy table: a reload mid-request cannot mix two versions.
    policy = rt.policies[tenant.config.policy]
    risk = classify(tenant.config.data_class, request.headers.get(DATA_CLASS_HEADER), parsed.body)
    ex.sticky_user = user_hash(parsed.body)
    facts = Facts(
        tenant=tenant.config.id,
        requested_model=parsed.model,
        requested_is_alias=parsed.model not in rt.catalog,  # saves choose() a copy of the facts
        data_class=risk.data_class,
        input_tokens=parsed.input_tokens_bound,
        max_output_tokens=parsed.max_output_tokens,
        capabilities=parsed.capabilities,
        allowed_models=tuple(tenant.config.allowed_models),
        sticky_key=key.id,
        sticky_user=ex.sticky_user,
        remaining_budget_usd=budget_left[0],
        remaining_budget_tokens=budget_left[1],
    )
    decision = choose(facts, rt.catalog, policy, rt.rng)
    if not decision.candidates and rt.breakers.open_count:  # never every candidate's circuit open at once
        decision = rt.breakers.revive(decision, lambda catalog: choose(facts, catalog, policy, rt.rng))
    ex.note_decision(decision, facts.data_class)
    ex.risk = risk
    if decision.outcome == "model_not_found":
        raise ModelNotFound(f"model '{_printable(parsed.model)}' does not exist", param="model")
    if decision.refused_for_budget():
        rt.metrics.rejections.labels(tenant.config.id, "budget").inc()
        raise BudgetExhausted("budget exhausted: no candidate model fits the remaining budget")
    if decision.outcome != "ok" or not decision.candidates:
        raise ModelNotAllowed(f"model '{_printable(parsed.model)}' is not allowed for this tenant: data class "
                              f"{risk.describe()}; {_printable(decision.reason, 600)}", param="model")
    # The allow-list is one of choose()'s filters, applied to every candidate that may be
    # dispatched (primary and fallbacks), so nothing outside it can be reached.
    return decision


def _printable(name: str, limit: int = 128) -> str:
    return "".join(ch for ch in name[:limit] if ch.isprintable())


async def reserve(rt: Runtime, tenant: TenantRuntime, parsed: ParsedRequest, targets: list[Target],
                  ex: Exchange) -> None:
    """Reserve the worst case over every candidate, so no fallback can overshoot."""
    if not tenant.budget_limits:
        return
    worst_tokens, worst_usd = 0, Decimal(0)
    for target in targets:
        out = parsed.max_output_tokens if parsed.max_output_tokens is not None else target.model.max_output_tokens
        out *= parsed.choices  # OpenAI `n`: every choice may use the whole output cap
        worst_tokens = max(worst_tokens, parsed.input_tokens_bound + out)
        worst_usd = max(worst_usd, cost(rt.prices[target.model.name], parsed.input_tokens_bound, out))
    ref = RequestRef(ex.request_id, ex.key_id, targets[0].model.name, targets[0].endpoint.provider)
    try:
        # Booked in the windows of the request's start (ex.ts), like its ledger rows.
        ex.reservation = await rt.ledger.reserve(
            tenant.config.id, tenant.budget_limits, worst_tokens, worst_usd, ex.ts, ref=ref
        )
    except BudgetExceeded as exc:
        rt.metrics.rejections.labels(tenant.config.id, "budget").inc()
        raise BudgetExhausted(f"budget exhausted: {exc}") from None


def decision_max_attempts(rt: Runtime, decision: Decision) -> int:
    # From the decision, not the policy table: a reload must not change an in-flight request.
    return decision.max_attempts


def request_id(rt: Runtime, request: Request) -> str:
    """The id to echo in x-request-id: the client's when it is sane, else a new unique one.
    Never a ledger key: `handle` books under a gateway-made id."""
    return client_request_id(request) or rt.new_request_id()


def client_request_id(request: Request) -> str | None:
    """The client's x-request-id when it is sane (printable ASCII, at most 128 characters)."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return None

