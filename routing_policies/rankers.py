"""Rankers, one per route objective: order the kept candidates, best first.

Every ranker is a stable sort, so ties keep the order the policy listed them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal

from .filters import effective_p95, estimated_cost, format_usd
from .model import Candidate, Facts
from .policy import Route, Weights

__all__ = ["RANKERS", "Ranker", "cheapest", "describe", "fastest", "ordered", "weighted"]

Ranker = Callable[[Facts, Sequence[Candidate], Route], list[Candidate]]

_DEFAULT_WEIGHTS = Weights()


def ordered(facts: Facts, kept: Sequence[Candidate], route: Route) -> list[Candidate]:
    return list(kept)


def cheapest(facts: Facts, kept: Sequence[Candidate], route: Route) -> list[Candidate]:
    return sorted(kept, key=lambda candidate: estimated_cost(facts, candidate))


def fastest(facts: Facts, kept: Sequence[Candidate], route: Route) -> list[Candidate]:
    def key(candidate: Candidate) -> tuple[bool, float]:
        observed = effective_p95(candidate, route)
        return (observed is None, observed if observed is not None else 0.0)

    return sorted(kept, key=key)


def weighted(facts: Facts, kept: Sequence[Candidate], route: Route) -> list[Candidate]:
    """Blend min-max normalised cost and p95 latency; lower score is better.

    Unknown latency counts as the slowest, so an unobserved model does not win on
    latency it has never shown.
    """
    weights = route.weights or _DEFAULT_WEIGHTS
    costs = _normalise_costs([estimated_cost(facts, c) for c in kept])
    latencies = _normalise_latencies([effective_p95(c, route) for c in kept])
    scores = {
        id(candidate): weights.cost * cost + weights.latency * lat
        for candidate, cost, lat in zip(kept, costs, latencies)
    }
    return sorted(kept, key=lambda candidate: scores[id(candidate)])


RANKERS: dict[str, Ranker] = {
    "ordered": ordered,
    "cheapest": cheapest,
    "fastest": fastest,
    "weighted": weighted,
}


def describe(facts: Facts, ranked: Sequence[Candidate], route: Route) -> str:
    """Why the first of `ranked` came first, e.g. `cheapest of 3 (llama-local $0.000000)`."""
    top, count = ranked[0], len(ranked)
    if route.objective == "cheapest":
        return f"cheapest of {count} ({top.name} ${estimated_cost(facts, top):.6f})"
    if route.objective == "fastest":
        observed = effective_p95(top, route)
        p95 = "unknown" if observed is None else f"{observed:.0f}ms"
        p95 += " assumed" if observed is not None and top.p95_latency_ms is None else ""
        return f"fastest of {count} ({top.name} p95 {p95})"
    if route.objective == "weighted":
        weights = route.weights or _DEFAULT_WEIGHTS
        cost = format_usd(estimated_cost(facts, top))
        return f"weighted of {count} ({top.name} {cost}, cost {weights.cost:g} / latency {weights.latency:g})"
    return f"ordered, first of {count} ({top.name})"


def _normalise_costs(values: Sequence[Decimal]) -> list[float]:
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [float((value - low) / (high - low)) for value in values]


def _normalise_latencies(values: Sequence[float | None]) -> list[float]:
    known = [value for value in values if value is not None]
    if not known:
        return [1.0 for _ in values]
    low, high = min(known), max(known)
    span = high - low
    return [1.0 if v is None else (0.0 if span == 0 else (v - low) / span) for v in values]
