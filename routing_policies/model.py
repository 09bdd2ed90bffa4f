"""The routing vocabulary: what a request needs, what a model offers, what was decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

__all__ = [
    "ALLOWED_BOUNDARIES",
    "BOUNDARIES",
    "CAPABILITIES",
    "CIRCUIT_OPEN",
    "DATA_CLASSES",
    "OUTCOMES",
    "OVER_BUDGET",
    "Candidate",
    "Decision",
    "Facts",
    "Rejected",
    "max_data_class",
]

# Ordered from least to most sensitive; `max_data_class` relies on the order.
DATA_CLASSES: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
BOUNDARIES: tuple[str, ...] = ("local", "vendor_zero_retention", "vendor")
CAPABILITIES: tuple[str, ...] = ("chat", "embeddings", "tools", "json", "vision")
OUTCOMES: tuple[str, ...] = ("ok", "model_not_found", "model_not_allowed")

_ANY_BOUNDARY = frozenset(BOUNDARIES)
ALLOWED_BOUNDARIES: dict[str, frozenset[str]] = {
    "public": _ANY_BOUNDARY,
    "internal": _ANY_BOUNDARY,
    "confidential": frozenset({"local", "vendor_zero_retention"}),
    "restricted": frozenset({"local"}),
}

_MILLION = Decimal(1_000_000)
# The rejection reason prefix of the budget filter; a refusal caused by it is a budget problem.
OVER_BUDGET = "over budget"
# The rejection reason prefix of an open circuit breaker (Candidate.breaker).
CIRCUIT_OPEN = "circuit open"


def max_data_class(*classes: str) -> str:
    """The most sensitive of `classes` (`public` when none are given)."""
    rank = 0
    for name in classes:
        if name not in DATA_CLASSES:
            raise ValueError(f"unknown data class {name!r} (expected one of {', '.join(DATA_CLASSES)})")
        rank = max(rank, DATA_CLASSES.index(name))
    return DATA_CLASSES[rank]


@dataclass(frozen=True)
class Candidate:
    """A routable model as the router sees it: static config plus observed health."""

    name: str
    provider: str
    locality: str
    data_boundary: str
    quality: int
    capabilities: frozenset[str]
    context_window: int
    max_output_tokens: int
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    p95_latency_ms: float | None = None
    healthy: bool = True
    # Why the gateway's circuit breaker keeps this model out of rotation (starts with
    # CIRCUIT_OPEN), or None while it is routable. Set by the gateway, read by the health filter.
    breaker: str | None = None

    def estimated_cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        """USD for a request of this size, from the per-million-token prices."""
        total = Decimal(input_tokens) * self.input_usd_per_mtok
        total += Decimal(output_tokens) * self.output_usd_per_mtok
        return total / _MILLION


@dataclass(frozen=True)
class Facts:
    """Everything about one request that routing may look at."""

    tenant: str
    requested_model: str
    data_class: str
    input_tokens: int
    max_output_tokens: int | None
    capabilities: frozenset[str]
    allowed_models: tuple[str, ...] = ("*",)
    sticky_key: str = ""
    # A pseudonymous id of the end user (the request's `user` field, hashed by the caller),
    # for splits that are sticky per user rather than per API key.
    sticky_user: str = ""
    # What the tenant may still spend in its tightest budget window (None: uncapped).
    # A candidate whose worst-case cost or tokens exceed it is rejected as "over budget".
    remaining_budget_usd: Decimal | None = None
    remaining_budget_tokens: int | None = None
    # Whether `requested_model` is an alias (not a model of the catalog); `choose` sets it.
    # Allow-listing an alias allows what the policy routes it to; allow-listing a model
    # allows that model only, never its fallbacks.
    requested_is_alias: bool = True
    # Memo of `filters.estimated_cost` per candidate object (id -> (candidate, cost)); the
    # cost is a pure function of these facts and the candidate, and is asked for several
    # times per `choose` (filters, ranker, summary, decision). Not part of the facts' value.
    _costs: dict[int, tuple[Candidate, Decimal]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )


@dataclass(frozen=True)
class Rejected:
    """A candidate the policy named but did not keep, and why."""

    model: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The outcome of `choose`: ordered candidates (primary first), or why there are none."""

    policy: str
    version: str
    route: str
    candidates: tuple[str, ...]
    reason: str
    rejected: tuple[Rejected, ...]
    estimated_cost_usd: dict[str, Decimal] = field(default_factory=dict)
    outcome: str = "ok"
    shadow: str | None = None
    # Carried with the decision so a request keeps its route's setting across a policy reload.
    max_attempts: int = 3
    shadow_account: str | None = None
    # The route's per-attempt timeout overrides (connect, first byte, idle, total), None where unset.
    timeouts: tuple[float | None, float | None, float | None, float | None] | None = None

    @property
    def primary(self) -> str | None:
        return self.candidates[0] if self.candidates else None

    def route_label(self) -> str:
        return f"{self.policy}@{self.version}:{self.route}"

    def refused_for_budget(self) -> bool:
        """No candidate left and at least one was dropped only for lack of budget."""
        return not self.candidates and any(r.reason.startswith(OVER_BUDGET) for r in self.rejected)
