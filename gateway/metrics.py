"""Prometheus metrics, on a registry owned by the app (no module-level mutable state).

Labels stay bounded: tenant, model, provider, status class; never request ids.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered", ["tenant", "model", "status"], registry=r)
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
            "gateway_tokens", "Tokens by type", ["tenant", "model", "type"], registry=r)
        self.cost = Counter(
            "gateway_cost_usd", "Cost in USD", ["tenant", "model"], registry=r)
        self.attempts = Counter(
            "gateway_upstream_attempts", "Upstream attempts by outcome", ["provider", "model", "outcome"], registry=r)
        self.fallbacks = Counter(
            "gateway_fallbacks", "Requests served by a fallback candidate", ["route"], registry=r)
        self.rejections = Counter(
            "gateway_rejections", "Requests refused before dispatch", ["tenant", "reason"], registry=r)
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being served", registry=r)
        self.policy_reloads = Counter(
            "gateway_policy_reload", "Policy reloads", ["result"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
