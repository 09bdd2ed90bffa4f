"""Candidate filters: each is `(facts, candidate, route) -> reason | None`.

None keeps the candidate; a string rejects it and is shown to operators verbatim
(`gateway explain`, audit), so reasons are short and say which limit was crossed.
A candidate is rejected by the first filter that fails, in `FILTERS` order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from fnmatch import fnmatchcase

from .model import ALLOWED_BOUNDARIES, OVER_BUDGET, Candidate, Facts
from .policy import Route

__all__ = [
    "FILTERS",
    "Filter",
    "all_of",
    "allow_list",
    "budget",
    "capabilities",
    "context_window",
    "cost_ceiling",
    "data_boundary",
    "effective_p95",
    "estimated_cost",
    "format_usd",
    "health",
    "latency",
    "output_tokens",
    "quality",
]

Filter = Callable[[Facts, Candidate, Route], str | None]

# Unknown data classes fail closed: treat them like the most sensitive one.
_STRICTEST = ALLOWED_BOUNDARIES["restricted"]


def output_tokens(facts: Facts, candidate: Candidate) -> int:
    """Output tokens to plan for: what the client asked for, else the model's maximum."""
    if facts.max_output_tokens is not None:
        return facts.max_output_tokens
    return candidate.max_output_tokens


def estimated_cost(facts: Facts, candidate: Candidate) -> Decimal:
    """Worst-case USD cost of this request on `candidate`."""
    memo = facts._costs.get(id(candidate))
    if memo is not None and memo[0] is candidate:
        return memo[1]
    cost = candidate.estimated_cost(facts.input_tokens, output_tokens(facts, candidate))
    facts._costs[id(candidate)] = (candidate, cost)
    return cost


def effective_p95(candidate: Candidate, route: Route) -> float | None:
    """The p95 latency routing uses: observed, else what the route assumes for unobserved models."""
    if candidate.p95_latency_ms is not None:
        return candidate.p95_latency_ms
    assumed = route.unknown_latency
    return float(assumed) if isinstance(assumed, (int, float)) else None


def format_usd(amount: Decimal) -> str:
    """`$0.0123`: at least four decimals, more only when they matter (up to six)."""
    text = f"{amount:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(4, '0')}"


def allow_list(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    # The allow-list names models or aliases: allowing the alias a client asked
    # for allows whatever the policy resolves it to; allowing a model allows only it.
    for pattern in facts.allowed_models:
        if fnmatchcase(candidate.name, pattern):
            return None
        if facts.requested_is_alias and fnmatchcase(facts.requested_model, pattern):
            return None
    return "not in tenant allow-list"


def data_boundary(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    allowed = ALLOWED_BOUNDARIES.get(facts.data_class, _STRICTEST)
    if candidate.data_boundary in allowed:
        return None
    return f"data_class={facts.data_class}: boundary {candidate.data_boundary} not allowed"


def quality(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    minimum = route.require.min_quality
    if minimum is None or candidate.quality >= minimum:
        return None
    return f"quality {candidate.quality} < {minimum}"


def latency(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    # By default an unobserved model gets the benefit of the doubt, or it never would be;
    # `unknown_latency` on the route says otherwise (reject, or assume a p95).
    observed = effective_p95(candidate, route)
    if observed is None:
        if route.unknown_latency == "reject" and route.uses_latency():
            return "p95 unknown (no latency data yet)"
        return None
    ceiling = route.require.max_p95_latency_ms
    if ceiling is None or observed <= ceiling:
        return None
    assumed = " (assumed)" if candidate.p95_latency_ms is None else ""
    return f"p95 {observed:.0f}ms{assumed} > {ceiling:.0f}ms"


def capabilities(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    needed = facts.capabilities | frozenset(route.require.capabilities)
    missing = sorted(needed - candidate.capabilities)
    if not missing:
        return None
    return f"lacks capability {', '.join(missing)}"


def context_window(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    needed = facts.input_tokens + output_tokens(facts, candidate)
    if needed <= candidate.context_window:
        return None
    return f"context {candidate.context_window} < needed {needed}"


def cost_ceiling(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    ceiling = route.require.max_usd_per_request
    if ceiling is None:
        return None
    cost = estimated_cost(facts, candidate)
    if cost <= ceiling:
        return None
    return f"est. cost {format_usd(cost)} > max ${ceiling}"


def budget(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    """The request's worst case on this model must fit what the tenant has left."""
    left_usd = facts.remaining_budget_usd
    if left_usd is not None:
        cost = estimated_cost(facts, candidate)
        if cost > left_usd:
            return f"{OVER_BUDGET} (est. {format_usd(cost)} > {format_usd(left_usd)} left)"
    left_tokens = facts.remaining_budget_tokens
    if left_tokens is not None:
        needed = facts.input_tokens + output_tokens(facts, candidate)
        if needed > left_tokens:
            return f"{OVER_BUDGET} ({needed} tokens > {left_tokens} left)"
    return None


def health(facts: Facts, candidate: Candidate, route: Route) -> str | None:
    if not candidate.healthy:
        return "unhealthy"
    return candidate.breaker  # "circuit open (...)" while the gateway's breaker is open, else None


FILTERS: tuple[Filter, ...] = (
    allow_list,
    data_boundary,
    quality,
    latency,
    capabilities,
    context_window,
    cost_ceiling,
    budget,
    health,
)


def all_of(filters: Sequence[Filter] = FILTERS) -> Filter:
    """Compose filters into one that reports the first failing reason."""
    chain = tuple(filters)

    def combined(facts: Facts, candidate: Candidate, route: Route) -> str | None:
        for check in chain:
            reason = check(facts, candidate, route)
            if reason is not None:
                return reason
        return None

    return combined
