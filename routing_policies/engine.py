"""The routing decision: a pure function of the request facts, the catalog and a policy.

No I/O, no clock, no globals: randomness (splits without a sticky key, shadow
sampling) comes from the `rng` the caller passes in, so tests and `gateway explain`
can reproduce any decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence

from .filters import FILTERS, Filter, all_of, estimated_cost
from .model import Candidate, Decision, Facts, Rejected
from .policy import REQUESTED, CompiledPolicy, PolicyTest, Route
from .rankers import RANKERS, describe

__all__ = ["catalog_for_test", "choose", "facts_from_test", "run_policy_tests"]

_DEFAULT_FILTER = all_of(FILTERS)
_UNKNOWN = "unknown model"


def choose(
    facts: Facts,
    catalog: Mapping[str, Candidate],
    policy: CompiledPolicy,
    rng: random.Random,
    *,
    filters: Filter = _DEFAULT_FILTER,
) -> Decision:
    """Pick the primary model and ordered fallbacks for one request."""
    if facts.requested_is_alias and facts.requested_model in catalog:
        facts = dataclasses.replace(facts, requested_is_alias=False)
    route = _first_matching_route(facts, policy)
    if route is None:
        reason = f"no route matches model '{facts.requested_model}'"
        return _refusal(policy, "", "model_not_found", reason, ())
    kept, rejected = _screen(facts, catalog, route, filters)
    if not kept:
        return _refuse_all(policy, route, rejected)
    ranked = RANKERS[route.objective](facts, kept, route)
    summary = describe(facts, ranked, route)
    if route.split is not None:
        ranked, summary = _apply_split(facts, policy, route, ranked, rng, summary)
    shadow = _pick_shadow(facts, catalog, route, ranked[0].name, rng, filters)
    if rejected:
        summary += f"; {len(rejected)} rejected"
    return Decision(
        policy=policy.name,
        version=policy.version,
        route=route.name,
        candidates=tuple(candidate.name for candidate in ranked),
        reason=f"route {route.name}: {summary}",
        rejected=tuple(rejected),
        estimated_cost_usd={c.name: estimated_cost(facts, c) for c in ranked},
        outcome="ok",
        shadow=shadow,
        max_attempts=route.max_attempts,
        timeouts=route.timeouts.as_tuple() if route.timeouts is not None else None,
        shadow_account=route.shadow.account if shadow is not None and route.shadow is not None else None,
    )


def facts_from_test(test: PolicyTest) -> Facts:
    """Request facts for a policy `tests:` case (data class defaults to internal)."""
    return Facts(
        tenant=test.tenant,
        requested_model=test.model,
        data_class=test.data_class or "internal",
        input_tokens=test.input_tokens,
        max_output_tokens=test.max_output_tokens,
        capabilities=frozenset(test.capabilities),
        remaining_budget_usd=test.remaining_budget_usd,
    )


def catalog_for_test(test: PolicyTest, catalog: Mapping[str, Candidate]) -> Mapping[str, Candidate]:
    """The catalog as a `tests:` case sees it: with the p95 latencies the case assumes."""
    if not test.p95_latency_ms:
        return catalog
    adjusted = dict(catalog)
    for name, p95 in test.p95_latency_ms.items():
        if name in adjusted:
            adjusted[name] = dataclasses.replace(adjusted[name], p95_latency_ms=p95)
    return adjusted


def run_policy_tests(
    policy: CompiledPolicy,
    catalog: Mapping[str, Candidate],
    *,
    make_facts: Callable[[PolicyTest], Facts] = facts_from_test,
) -> list[tuple[PolicyTest, str, bool]]:
    """Run a policy's `tests:`; each result is (test, got, passed).

    `got` is the primary model, or `error:<outcome>`. `make_facts` lets the caller
    add what the policy file cannot know, such as the tenant's allow-list.
    """
    results: list[tuple[PolicyTest, str, bool]] = []
    for test in policy.file.tests:
        decision = choose(make_facts(test), catalog_for_test(test, catalog), policy, random.Random(0))
        got = decision.primary if decision.primary is not None else f"error:{decision.outcome}"
        results.append((test, got, got == test.expect))
    return results


def _first_matching_route(facts: Facts, policy: CompiledPolicy) -> Route | None:
    for route, matcher in zip(policy.file.routes, policy.matchers):
        if matcher.matches(facts):
            return route
    return None


def _expand(names: Sequence[str], facts: Facts) -> list[str]:
    """Replace `$requested` with the requested model, dropping repeats."""
    expanded: list[str] = []
    for name in names:
        actual = facts.requested_model if name == REQUESTED else name
        if actual not in expanded:
            expanded.append(actual)
    return expanded


def _screen(
    facts: Facts, catalog: Mapping[str, Candidate], route: Route, filters: Filter
) -> tuple[list[Candidate], tuple[Rejected, ...]]:
    kept: list[Candidate] = []
    rejected: list[Rejected] = []
    for name in _expand(route.candidates, facts):
        candidate = catalog.get(name)
        why = _UNKNOWN if candidate is None else filters(facts, candidate, route)
        if candidate is not None and why is None:
            kept.append(candidate)
        else:
            rejected.append(Rejected(name, why or _UNKNOWN))
    return kept, tuple(rejected)


def _refuse_all(policy: CompiledPolicy, route: Route, rejected: tuple[Rejected, ...]) -> Decision:
    # Nothing known at all is "not found" (404); known but filtered is "not allowed" (403).
    if all(r.reason == _UNKNOWN for r in rejected):
        names = ", ".join(f"'{r.model}'" for r in rejected)
        reason = f"route {route.name}: unknown model {names}"
        return _refusal(policy, route.name, "model_not_found", reason, rejected)
    details = "; ".join(f"{r.model}: {r.reason}" for r in rejected)
    reason = f"route {route.name}: no candidate allowed ({details})"
    return _refusal(policy, route.name, "model_not_allowed", reason, rejected)


def _refusal(
    policy: CompiledPolicy, route: str, outcome: str, reason: str, rejected: tuple[Rejected, ...]
) -> Decision:
    return Decision(
        policy=policy.name,
        version=policy.version,
        route=route,
        candidates=(),
        reason=reason,
        rejected=rejected,
        estimated_cost_usd={},
        outcome=outcome,
    )


def _apply_split(
    facts: Facts,
    policy: CompiledPolicy,
    route: Route,
    ranked: list[Candidate],
    rng: random.Random,
    summary: str,
) -> tuple[list[Candidate], str]:
    """Move the split's pick to the front; the rest keep the objective's order.

    Only entries whose model survived the filters take part, so a filtered-out
    arm's share goes to the others instead of failing the request.
    """
    by_name = {candidate.name: candidate for candidate in ranked}
    entries: list[tuple[str, int]] = []
    for entry in route.split or []:
        name = facts.requested_model if entry.model == REQUESTED else entry.model
        if name in by_name and entry.weight > 0 and name not in (n for n, _ in entries):
            entries.append((name, entry.weight))
    if not entries:
        return ranked, f"{summary} (no split arm available)"
    total = sum(weight for _, weight in entries)
    by_user = route.sticky == "user" and bool(facts.sticky_user)
    key = facts.sticky_user if by_user else facts.sticky_key
    if key:
        point, how = _sticky_point(policy.name, route.name, key, total), "sticky per user" if by_user else "sticky"
    else:
        point, how = rng.randrange(total), "random"
    picked = _pick_weighted(entries, point)
    arms = " / ".join(f"{name} {weight}" for name, weight in entries)
    order = [by_name[picked]] + [c for c in ranked if c.name != picked]
    return order, f"split {arms} picked {picked} ({how}); fallbacks by {summary}"


def _sticky_point(policy: str, route: str, key: str, total: int) -> int:
    # sha256, not hash(): the same key must land on the same arm in every process.
    digest = hashlib.sha256(f"{policy}\x00{route}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % total


def _pick_weighted(entries: Sequence[tuple[str, int]], point: int) -> str:
    for name, weight in entries:
        if point < weight:
            return name
        point -= weight
    return entries[-1][0]


def _pick_shadow(
    facts: Facts,
    catalog: Mapping[str, Candidate],
    route: Route,
    primary: str,
    rng: random.Random,
    filters: Filter,
) -> str | None:
    """The model to mirror this request to, if sampled; it must pass every filter
    (a shadow must never see data its boundary forbids) and differ from the primary."""
    if route.shadow is None or rng.random() >= route.shadow.sample:
        return None
    name = facts.requested_model if route.shadow.model == REQUESTED else route.shadow.model
    candidate = catalog.get(name)
    if candidate is None or name == primary or filters(facts, candidate, route) is not None:
        return None
    return name
