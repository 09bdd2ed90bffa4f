"""Prometheus metrics, on a registry owned by the app (no module-level mutable state).

Names follow Prometheus conventions (base units in the name: `_seconds`, `_usd`, `_tokens`;
counters exposed with `_total`). Labels stay bounded: tenant and model come from the
config, provider and route from the config and policies, status is a class (`2xx`); never
request ids or client-supplied strings. Gauges that describe state (budget remaining,
breaker state) are refreshed when /metrics is scraped, not on the request path.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per-request series are tallied in plain dicts on the hot path (`tally.add`) and
        # exposed by a collector at scrape time: one dict lookup per request instead of ten
        # locked prometheus_client children.
        self.tally = RequestTally()
        r.register(self.tally)
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


class _Series:
    """What one (tenant, model, status class, route, provider) has added up."""

    __slots__ = ("cost", "duration", "duration_sum", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.duration = [0] * (len(_LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.duration_sum = 0.0
        self.tokens: list[int] | None = None  # input, output, cached_input (only once a model served)
        self.cost = 0.0


class _Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum = buckets, [0] * (len(buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # `le` buckets: the first bound >= value
        self.sum += value

    def samples(self) -> tuple[list[tuple[str, float]], float]:
        total, out = 0, list[tuple[str, float]]()
        for bound, count in zip((*map(_bound, self.buckets), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out, self.sum


def _bound(value: float) -> str:
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]  # as prometheus_client's Histogram writes its `le` labels


class RequestTally(Collector):
    """The per-request series: requests, durations, overhead, time to first token, tokens, cost,
    upstream attempts, fallbacks. Counted on the event loop, exposed when scraped (same names,
    labels and types as prometheus_client's own Counter/Histogram would give)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str, str], _Series] = {}
        self._overhead = _Histogram(_OVERHEAD_BUCKETS)
        self._ttft: dict[str, _Histogram] = {}
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._fallbacks: dict[str, int] = {}

    def add(self, tenant: str, model: str, status_class: str, route: str, provider: str, duration_s: float,
            overhead_s: float | None, ttft_s: float | None, tokens: tuple[int, int, int] | None, cost_usd: float,
            fallback_route: str | None, attempts: Iterable[tuple[str, str, str]]) -> None:
        key = (tenant, model, status_class, route, provider)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.requests += 1
        series.duration[bisect.bisect_left(_LATENCY_BUCKETS, duration_s)] += 1
        series.duration_sum += duration_s
        if tokens is not None:
            if series.tokens is None:
                series.tokens = [0, 0, 0]
            counts = series.tokens
            counts[0] += tokens[0]
            counts[1] += tokens[1]
            counts[2] += tokens[2]
            series.cost += cost_usd
        if overhead_s is not None:
            self._overhead.observe(overhead_s)
        if ttft_s is not None:
            hist = self._ttft.get(model)
            if hist is None:
                hist = self._ttft[model] = _Histogram(_LATENCY_BUCKETS)
            hist.observe(ttft_s)
        if fallback_route is not None:
            self._fallbacks[fallback_route] = self._fallbacks.get(fallback_route, 0) + 1
        for attempt in attempts:
            self._attempts[attempt] = self._attempts.get(attempt, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("gateway_requests", "Requests answered", labels=["tenant", "model", "status"])
        routes = CounterMetricFamily("gateway_route_requests", "Requests answered, by policy route and serving provider",
                                     labels=["route", "provider", "status"])
        duration = HistogramMetricFamily("gateway_request_duration_seconds", "Request duration, edge to last byte",
                                         labels=["tenant", "model"])
        tokens = CounterMetricFamily("gateway_tokens", "Tokens by type (input, cached_input, output)",
                                     labels=["tenant", "model", "type"])
        cost = CounterMetricFamily("gateway_cost_usd", "Cost in USD", labels=["tenant", "model"])
        by_status: dict[tuple[str, str, str], int] = {}
        by_route: dict[tuple[str, str, str], int] = {}
        by_model: dict[tuple[str, str], _Histogram] = {}
        used: dict[tuple[str, str], list[float]] = {}
        for (tenant, model, status, route, provider), s in self._series.items():
            by_status[(tenant, model, status)] = by_status.get((tenant, model, status), 0) + s.requests
            by_route[(route, provider, status)] = by_route.get((route, provider, status), 0) + s.requests
            hist = by_model.get((tenant, model))
            if hist is None:
                hist = by_model[(tenant, model)] = _Histogram(_LATENCY_BUCKETS)
            hist.counts = [a + b for a, b in zip(hist.counts, s.duration)]
            hist.sum += s.duration_sum
            if s.tokens is not None:
                acc = used.setdefault((tenant, model), [0, 0, 0, 0.0])
                for i in range(3):
                    acc[i] += s.tokens[i]
                acc[3] += s.cost
        for labels, n in by_status.items():
            requests.add_metric(list(labels), n)
        for route_labels, n in by_route.items():
            routes.add_metric(list(route_labels), n)
        for model_labels, hist in by_model.items():
            buckets, total = hist.samples()
            duration.add_metric(list(model_labels), buckets, total)
        for (tenant, model), (inp, out, cached, usd) in used.items():
            tokens.add_metric([tenant, model, "input"], inp)
            tokens.add_metric([tenant, model, "output"], out)
            tokens.add_metric([tenant, model, "cached_input"], cached)
            cost.add_metric([tenant, model], usd)
        ttft = HistogramMetricFamily("gateway_time_to_first_token_seconds", "Time to the first streamed content byte",
                                     labels=["model"])
        for model, hist in self._ttft.items():
            buckets, total = hist.samples()
            ttft.add_metric([model], buckets, total)
        overhead = HistogramMetricFamily("gateway_overhead_seconds", "Time spent in the gateway outside the upstream call")
        buckets, total = self._overhead.samples()
        overhead.add_metric([], buckets, total)
        attempts = CounterMetricFamily("gateway_upstream_attempts", "Upstream attempts by outcome",
                                       labels=["provider", "model", "outcome"])
        for labels, n in self._attempts.items():
            attempts.add_metric(list(labels), n)
        fallbacks = CounterMetricFamily("gateway_fallbacks", "Requests served by a fallback candidate", labels=["route"])
        for route, n in self._fallbacks.items():
            fallbacks.add_metric([route], n)
        yield from (requests, routes, duration, ttft, overhead, tokens, cost, attempts, fallbacks)
