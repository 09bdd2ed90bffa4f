"""Prometheus metrics, on a registry owned by the app (no module-level mutable state).

Names follow Prometheus conventions (base units in the name: `_seconds`, `_usd`, `_tokens`;
counters exposed with `_total`). Labels stay bounded: tenant and model come from the
config, provider and route from the config and policies, status is a class (`2xx`); never
request ids or client-supplied strings. Gauges that describe state (budget remaining,
breaker state) are refreshed when /metrics is scraped, not on the request path.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered", ["tenant", "model", "status"], registry=r)
        self.route_requests = Counter(
            "gateway_route_requests", "Requests answered, by policy route and serving provider",
            ["route", "provider", "status"], registry=r)
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Request duration, edge to last byte",
            ["tenant", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Time to the first streamed content byte",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Time spent in the gateway outside the upstream call",
            buckets=_OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens by type (input, cached_input, output)", ["tenant", "model", "type"], registry=r)
        self.cost = Counter(
            "gateway_cost_usd", "Cost in USD", ["tenant", "model"], registry=r)
        self.attempts = Counter(
            "gateway_upstream_attempts", "Upstream attempts by outcome", ["provider", "model", "outcome"], registry=r)
        self.fallbacks = Counter(
            "gateway_fallbacks", "Requests served by a fallback candidate", ["route"], registry=r)
        self.rejections = Counter(
            "gateway_rejections", "Requests refused before dispatch (reason: rate_limit, budget)",
            ["tenant", "reason"], registry=r)
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being served", registry=r)
        self.policy_reloads = Counter(
            "gateway_policy_reload", "Policy reloads", ["result"], registry=r)
        self.budget_remaining_usd = Gauge(
            "gateway_budget_remaining_usd", "USD left in the current budget window (after reservations)",
            ["tenant", "window"], registry=r)
        self.budget_remaining_tokens = Gauge(
            "gateway_budget_remaining_tokens", "Tokens left in the current budget window (after reservations)",
            ["tenant", "window"], registry=r)
        self.breaker_state = Gauge(
            "gateway_provider_breaker_state",
            "0 closed (routable), 1 open (every model skipped: unhealthy, no key, or circuit open)",
            ["provider"], registry=r)


    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: the hot path counts each request several times,
        and label values are bounded (config names and status classes)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_budgets(self, tenant: str, balances: Iterable[Any]) -> None:
        for b in balances:
            if b.remaining_usd is not None:
                self.budget_remaining_usd.labels(tenant, b.window).set(float(b.remaining_usd))
            if b.remaining_tokens is not None:
                self.budget_remaining_tokens.labels(tenant, b.window).set(b.remaining_tokens)

    def set_breakers(self, catalog: dict[str, Any]) -> None:
        routable: dict[str, bool] = {}
        for candidate in catalog.values():
            ok = bool(candidate.healthy) and not getattr(candidate, "breaker", None)  # circuit open: skipped too
            routable[candidate.provider] = routable.get(candidate.provider, False) or ok
        for provider, ok in routable.items():
            self.breaker_state.labels(provider).set(0 if ok else 1)


async def refresh(rt: Any, now: datetime) -> None:
    """Scrape-time gauges: budget remaining per tenant and window, provider breaker state."""
    m: Metrics = rt.metrics
    for tenant_id, tenant in rt.tenants.items():
        if tenant.budget_limits:
            m.set_budgets(tenant_id, await rt.ledger.balance(tenant_id, tenant.budget_limits, now))
    m.set_breakers(rt.catalog)
