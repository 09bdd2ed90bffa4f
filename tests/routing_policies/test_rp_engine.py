"""The pure routing decision: filters, rankers, split, shadow, outcomes, policy tests.

Tables read `(facts, candidates) -> (model, reason)`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from routing_policies import filters as f
from routing_policies.engine import choose, facts_from_test, run_policy_tests
from routing_policies.model import (
    ALLOWED_BOUNDARIES,
    Candidate,
    Decision,
    Facts,
    Rejected,
    max_data_class,
)
from routing_policies.policy import (
    CompiledPolicy,
    PolicyFile,
    PolicyTest,
    Route,
    compile_policy,
)
from routing_policies.rankers import RANKERS

LLAMA = Candidate(
    name="llama-local", provider="ollama", locality="local", data_boundary="local", quality=1,
    capabilities=frozenset({"chat", "json"}), context_window=8192, max_output_tokens=2048,
    input_usd_per_mtok=Decimal(0), output_usd_per_mtok=Decimal(0), p95_latency_ms=4100.0,
)
MINI = Candidate(
    name="gpt-4o-mini", provider="openai", locality="hosted", data_boundary="vendor", quality=2,
    capabilities=frozenset({"chat", "tools", "json", "vision"}), context_window=128000,
    max_output_tokens=16384, input_usd_per_mtok=Decimal("0.15"), output_usd_per_mtok=Decimal("0.60"),
    p95_latency_ms=900.0,
)
HAIKU = Candidate(
    name="claude-haiku", provider="anthropic", locality="hosted", data_boundary="vendor_zero_retention",
    quality=2, capabilities=frozenset({"chat", "tools"}), context_window=200000, max_output_tokens=8192,
    input_usd_per_mtok=Decimal("0.80"), output_usd_per_mtok=Decimal("4.00"), p95_latency_ms=None,
)
CATALOG = {c.name: c for c in (LLAMA, MINI, HAIKU)}


def facts(model: str = "fast", **changes: Any) -> Facts:
    base = Facts(
        tenant="search", requested_model=model, data_class="internal", input_tokens=1000,
        max_output_tokens=500, capabilities=frozenset({"chat"}),
    )
    return replace(base, **changes)


def route(**fields: Any) -> Route:
    data: dict[str, Any] = {"name": "r", "candidates": ["llama-local", "gpt-4o-mini", "claude-haiku"]}
    return Route.model_validate(data | fields)


def policy(*routes: dict[str, Any], tests: list[dict[str, Any]] | None = None) -> CompiledPolicy:
    file = PolicyFile.model_validate({"name": "p", "routes": list(routes), "tests": tests or []})
    return compile_policy(file, version="abc123")


def decide(p: CompiledPolicy, fx: Facts, catalog: dict[str, Candidate] = CATALOG, seed: int = 0) -> Decision:
    return choose(fx, catalog, p, random.Random(seed))


# --- vocabulary -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "highest"),
    [((), "public"), (("internal",), "internal"), (("internal", "public"), "internal"),
     (("confidential", "internal", "restricted"), "restricted"), (("public", "confidential"), "confidential")],
)
def test_max_data_class(classes: tuple[str, ...], highest: str) -> None:
    assert max_data_class(*classes) == highest


def test_max_data_class_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown data class 'secret'"):
        max_data_class("internal", "secret")


def test_estimated_cost_is_exact_decimal() -> None:
    assert MINI.estimated_cost(1000, 500) == Decimal("0.00045")
    assert HAIKU.estimated_cost(1_000_000, 1_000_000) == Decimal("4.80")
    assert LLAMA.estimated_cost(10**9, 10**9) == 0


def test_decision_helpers() -> None:
    decision = Decision("p", "abc123", "cheap", ("a", "b"), "why", (), {}, "ok")
    assert decision.primary == "a" and decision.route_label() == "p@abc123:cheap"
    assert replace(decision, candidates=()).primary is None


@pytest.mark.parametrize(
    ("data_class", "boundary", "allowed"),
    [
        (dc, b, ok)
        for dc, allowed_set in [
            ("public", {"local", "vendor_zero_retention", "vendor"}),
            ("internal", {"local", "vendor_zero_retention", "vendor"}),
            ("confidential", {"local", "vendor_zero_retention"}),
            ("restricted", {"local"}),
            ("unheard-of", {"local"}),  # unknown classes fail closed
        ]
        for b in ("local", "vendor_zero_retention", "vendor")
        for ok in [b in allowed_set]
    ],
)
def test_data_class_boundary_table(data_class: str, boundary: str, allowed: bool) -> None:
    candidate = replace(MINI, data_boundary=boundary)
    reason = f.data_boundary(facts(data_class=data_class), candidate, route())
    assert (reason is None) is allowed
    if not allowed:
        assert reason == f"data_class={data_class}: boundary {boundary} not allowed"
    if data_class in ALLOWED_BOUNDARIES:
        assert (boundary in ALLOWED_BOUNDARIES[data_class]) is allowed


# --- filters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "fx", "candidate", "rt", "reason"),
    [
        (f.allow_list, facts(), MINI, route(), None),
        (f.allow_list, facts(allowed_models=("gpt-*",)), MINI, route(), None),
        (f.allow_list, facts(allowed_models=("fast",)), LLAMA, route(), None),  # alias allowed
        # Allowing a model allows that model only, not what its route falls back to.
        (f.allow_list, facts("gpt-4o-mini", allowed_models=("gpt-4o-mini",), requested_is_alias=False), LLAMA,
         route(), "not in tenant allow-list"),
        (f.allow_list, facts("gpt-4o-mini", allowed_models=("gpt-4o-mini",), requested_is_alias=False), MINI,
         route(), None),
        (f.allow_list, facts(allowed_models=("gpt-*",)), LLAMA, route(), "not in tenant allow-list"),
        (f.allow_list, facts(allowed_models=()), MINI, route(), "not in tenant allow-list"),
        (f.data_boundary, facts(data_class="restricted"), MINI, route(),
         "data_class=restricted: boundary vendor not allowed"),
        (f.quality, facts(), LLAMA, route(require={"min_quality": 2}), "quality 1 < 2"),
        (f.quality, facts(), MINI, route(require={"min_quality": 2}), None),
        (f.quality, facts(), LLAMA, route(), None),
        (f.latency, facts(), LLAMA, route(require={"max_p95_latency_ms": 3000}), "p95 4100ms > 3000ms"),
        (f.latency, facts(), MINI, route(require={"max_p95_latency_ms": 3000}), None),
        (f.latency, facts(), HAIKU, route(require={"max_p95_latency_ms": 1}), None),  # unknown p95 kept
        (f.capabilities, facts(capabilities=frozenset({"chat", "tools"})), LLAMA, route(), "lacks capability tools"),
        (f.capabilities, facts(), HAIKU, route(require={"capabilities": ["vision", "json"]}),
         "lacks capability json, vision"),
        (f.capabilities, facts(capabilities=frozenset({"chat", "tools"})), MINI, route(), None),
        (f.context_window, facts(input_tokens=10000, max_output_tokens=2000), LLAMA, route(),
         "context 8192 < needed 12000"),
        (f.context_window, facts(input_tokens=7000, max_output_tokens=None), LLAMA, route(),
         "context 8192 < needed 9048"),
        (f.context_window, facts(input_tokens=6000, max_output_tokens=None), LLAMA, route(), None),
        (f.cost_ceiling, facts(input_tokens=10000, max_output_tokens=500), HAIKU,
         route(require={"max_usd_per_request": "0.01"}), None),  # exactly at the ceiling
        (f.cost_ceiling, facts(input_tokens=12000, max_output_tokens=700), HAIKU,
         route(require={"max_usd_per_request": "0.01"}), "est. cost $0.0124 > max $0.01"),
        (f.cost_ceiling, facts(input_tokens=1, max_output_tokens=None), HAIKU,
         route(require={"max_usd_per_request": "0.00001"}), "est. cost $0.032769 > max $0.00001"),
        (f.cost_ceiling, facts(), LLAMA, route(require={"max_usd_per_request": 0}), None),
        (f.health, facts(), replace(MINI, healthy=False), route(), "unhealthy"),
        (f.health, facts(), MINI, route(), None),
    ],
)
def test_filter_reasons(check: f.Filter, fx: Facts, candidate: Candidate, rt: Route, reason: str | None) -> None:
    assert check(fx, candidate, rt) == reason


@pytest.mark.parametrize(
    ("amount", "text"),
    [("0", "$0.0000"), ("0.0123", "$0.0123"), ("0.00015", "$0.00015"), ("0.0000001", "$0.0000"),
     ("12.5", "$12.5000"), ("0.12345678", "$0.123457")],
)
def test_format_usd(amount: str, text: str) -> None:
    assert f.format_usd(Decimal(amount)) == text


def test_first_failing_filter_wins() -> None:
    # restricted + needs tools: the boundary filter comes before the capability filter.
    fx = facts(data_class="restricted", capabilities=frozenset({"tools"}), allowed_models=("*",))
    assert f.all_of()(fx, MINI, route()) == "data_class=restricted: boundary vendor not allowed"
    assert f.all_of([f.capabilities, f.data_boundary])(fx, LLAMA, route()) == "lacks capability tools"
    assert f.all_of([])(fx, MINI, route()) is None


# --- rankers --------------------------------------------------------------------------------

FAST = replace(MINI, name="fast-one", p95_latency_ms=100.0)
TIE_A = replace(MINI, name="tie-a")
TIE_B = replace(MINI, name="tie-b")


@pytest.mark.parametrize(
    ("objective", "kept", "order"),
    [
        ("ordered", [HAIKU, MINI, LLAMA], ["claude-haiku", "gpt-4o-mini", "llama-local"]),
        ("cheapest", [HAIKU, MINI, LLAMA], ["llama-local", "gpt-4o-mini", "claude-haiku"]),
        ("cheapest", [TIE_B, TIE_A], ["tie-b", "tie-a"]),
        ("fastest", [LLAMA, HAIKU, MINI, FAST], ["fast-one", "gpt-4o-mini", "llama-local", "claude-haiku"]),
        ("fastest", [HAIKU, TIE_B, TIE_A], ["tie-b", "tie-a", "claude-haiku"]),
        ("weighted", [HAIKU, MINI, LLAMA], ["gpt-4o-mini", "llama-local", "claude-haiku"]),
        ("weighted", [TIE_B, TIE_A], ["tie-b", "tie-a"]),
    ],
)
def test_rankers(objective: str, kept: list[Candidate], order: list[str]) -> None:
    ranked = RANKERS[objective](facts(), kept, route(objective=objective))
    assert [c.name for c in ranked] == order


@pytest.mark.parametrize(
    ("weights", "first"),
    [({"cost": 1, "latency": 0}, "llama-local"), ({"cost": 0, "latency": 1}, "gpt-4o-mini"),
     ({"cost": 0.9, "latency": 0.1}, "llama-local"), ({"cost": 0.1, "latency": 0.9}, "gpt-4o-mini")],
)
def test_weighted_blend_follows_weights(weights: dict[str, float], first: str) -> None:
    rt = route(objective="weighted", weights=weights)
    assert RANKERS["weighted"](facts(), [LLAMA, MINI, HAIKU], rt)[0].name == first


# --- choose ---------------------------------------------------------------------------------

DEFAULT = policy(
    {"name": "sensitive-stays-local", "when": {"data_class": ["confidential", "restricted"]},
     "candidates": ["llama-local"]},
    {"name": "cheap-chat", "when": {"model": "fast"}, "objective": "cheapest",
     "candidates": ["llama-local", "gpt-4o-mini", "claude-haiku"]},
    {"name": "quick", "when": {"model": "quick"}, "objective": "fastest",
     "candidates": ["llama-local", "gpt-4o-mini", "claude-haiku"], "require": {"max_p95_latency_ms": 3000}},
    {"name": "blend", "when": {"model": "blend"}, "objective": "weighted",
     "candidates": ["llama-local", "gpt-4o-mini", "claude-haiku"]},
    {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested", "gpt-4o-mini"]},
)


@pytest.mark.parametrize(
    ("fx", "route_name", "candidates", "reason"),
    [
        (facts(), "cheap-chat", ("llama-local", "gpt-4o-mini", "claude-haiku"),
         "route cheap-chat: cheapest of 3 (llama-local $0.000000)"),
        (facts(data_class="restricted"), "sensitive-stays-local", ("llama-local",),
         "route sensitive-stays-local: ordered, first of 1 (llama-local)"),
        (facts("quick"), "quick", ("gpt-4o-mini", "claude-haiku"),
         "route quick: fastest of 2 (gpt-4o-mini p95 900ms); 1 rejected"),
        (facts("blend"), "blend", ("gpt-4o-mini", "llama-local", "claude-haiku"),
         "route blend: weighted of 3 (gpt-4o-mini $0.00045, cost 0.5 / latency 0.5)"),
        (facts("claude-haiku"), "direct", ("claude-haiku", "gpt-4o-mini"),
         "route direct: ordered, first of 2 (claude-haiku)"),
        (facts("gpt-4o-mini"), "direct", ("gpt-4o-mini",), "route direct: ordered, first of 1 (gpt-4o-mini)"),
        (facts("ghost"), "direct", ("gpt-4o-mini",), "route direct: ordered, first of 1 (gpt-4o-mini); 1 rejected"),
        (facts(capabilities=frozenset({"tools"})), "cheap-chat", ("gpt-4o-mini", "claude-haiku"),
         "route cheap-chat: cheapest of 2 (gpt-4o-mini $0.000450); 1 rejected"),
    ],
)
def test_choose_routes(fx: Facts, route_name: str, candidates: tuple[str, ...], reason: str) -> None:
    decision = decide(DEFAULT, fx)
    assert (decision.outcome, decision.route, decision.candidates, decision.reason) == (
        "ok", route_name, candidates, reason,
    )
    assert set(decision.estimated_cost_usd) == set(candidates)
    assert decision.policy == "p" and decision.version == "abc123" and decision.shadow is None


def test_choose_keeps_every_rejection_with_its_reason() -> None:
    fx = facts("ghost", data_class="confidential", allowed_models=("llama-*", "gpt-*"))
    p = policy({"name": "all", "candidates": ["$requested", "llama-local", "gpt-4o-mini", "claude-haiku"],
                "require": {"min_quality": 1}})
    decision = decide(p, fx)
    assert decision.candidates == ("llama-local",)
    assert decision.rejected == (
        Rejected("ghost", "unknown model"),
        Rejected("gpt-4o-mini", "data_class=confidential: boundary vendor not allowed"),
        Rejected("claude-haiku", "not in tenant allow-list"),
    )


def test_estimated_costs_use_requested_or_model_max_output() -> None:
    decision = decide(DEFAULT, facts(max_output_tokens=None, input_tokens=0))
    assert decision.estimated_cost_usd == {
        "llama-local": Decimal(0),
        "gpt-4o-mini": Decimal(16384) * Decimal("0.60") / 1_000_000,
        "claude-haiku": Decimal(8192) * Decimal("4.00") / 1_000_000,
    }


@pytest.mark.parametrize(
    ("p", "fx", "outcome", "reason"),
    [
        (policy({"name": "only-fast", "when": {"model": "fast"}, "candidates": ["llama-local"]}),
         facts("slow"), "model_not_found", "no route matches model 'slow'"),
        (DEFAULT, facts("ghost", data_class="restricted"), "ok", None),
        (policy({"name": "direct", "candidates": ["$requested"]}), facts("ghost"), "model_not_found",
         "route direct: unknown model 'ghost'"),
        (policy({"name": "typos", "candidates": ["lama", "gtp"]}), facts(), "model_not_found",
         "route typos: unknown model 'lama', 'gtp'"),
        (policy({"name": "direct", "candidates": ["$requested"]}), facts("gpt-4o-mini", data_class="restricted"),
         "model_not_allowed", ("route direct: no candidate allowed "
         "(gpt-4o-mini: data_class=restricted: boundary vendor not allowed)")),
        (DEFAULT, facts("gpt-4o-mini", allowed_models=("llama-*",)), "model_not_allowed",
         "route direct: no candidate allowed (gpt-4o-mini: not in tenant allow-list)"),
    ],
)
def test_refusals(p: CompiledPolicy, fx: Facts, outcome: str, reason: str | None) -> None:
    decision = decide(p, fx)
    assert decision.outcome == outcome
    if outcome != "ok":
        assert decision.candidates == () and decision.primary is None and decision.estimated_cost_usd == {}
    if reason is not None:
        assert decision.reason == reason


def test_not_allowed_summarises_every_reason() -> None:
    p = policy({"name": "strict", "candidates": ["ghost", "llama-local", "claude-haiku"],
                "require": {"min_quality": 2, "capabilities": ["vision"]}})
    decision = decide(p, facts())
    assert decision.outcome == "model_not_allowed" and decision.route == "strict"
    assert decision.reason == (
        "route strict: no candidate allowed (ghost: unknown model; llama-local: quality 1 < 2; "
        "claude-haiku: lacks capability vision)"
    )
    assert decision.route_label() == "p@abc123:strict"


def test_choose_is_reproducible() -> None:
    p = policy({"name": "ab", "candidates": ["gpt-4o-mini", "claude-haiku"],
                "split": [{"model": "gpt-4o-mini", "weight": 1}, {"model": "claude-haiku", "weight": 1}],
                "shadow": {"model": "llama-local", "sample": 0.5}})
    runs = [[decide(p, facts(), seed=seed) for seed in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]


# --- split ----------------------------------------------------------------------------------

CANARY = policy({
    "name": "canary", "candidates": ["gpt-4o-mini", "claude-haiku", "llama-local"], "objective": "cheapest",
    "split": [{"model": "gpt-4o-mini", "weight": 90}, {"model": "claude-haiku", "weight": 10}],
})


@pytest.mark.parametrize("key", ["key-1", "key-2", "tenant/abc", "x" * 200])
def test_split_is_sticky_per_key(key: str) -> None:
    picks = {decide(CANARY, facts(sticky_key=key), seed=seed).primary for seed in range(25)}
    assert len(picks) == 1


def test_split_sticky_assignment_is_stable_across_processes() -> None:
    # sha256-based: these values must never change, or every key would reshuffle on upgrade.
    assert [decide(CANARY, facts(sticky_key=f"k{i}")).primary for i in range(6)] == [
        _sticky_expected(f"k{i}") for i in range(6)
    ]


def _sticky_expected(key: str) -> str:
    digest = hashlib.sha256(f"p\x00canary\x00{key}".encode()).digest()
    return "gpt-4o-mini" if int.from_bytes(digest[:8], "big") % 100 < 90 else "claude-haiku"


@pytest.mark.parametrize(("sticky", "low", "high"), [(True, 0.87, 0.93), (False, 0.87, 0.93)])
def test_split_respects_weights(sticky: bool, low: float, high: float) -> None:
    rng = random.Random(7)
    picks = [
        choose(facts(sticky_key=f"key-{i}" if sticky else ""), CATALOG, CANARY, rng).primary for i in range(4000)
    ]
    share = picks.count("gpt-4o-mini") / len(picks)
    assert low < share < high
    assert set(picks) == {"gpt-4o-mini", "claude-haiku"}


def test_split_fallbacks_follow_the_objective() -> None:
    decision = decide(CANARY, facts(sticky_key=_key_for("claude-haiku")))
    assert decision.candidates == ("claude-haiku", "llama-local", "gpt-4o-mini")
    assert decision.reason == (
        "route canary: split gpt-4o-mini 90 / claude-haiku 10 picked claude-haiku (sticky); "
        "fallbacks by cheapest of 3 (llama-local $0.000000)"
    )


def test_split_skips_arms_that_were_filtered_out() -> None:
    fx = facts(sticky_key=_key_for("claude-haiku"), capabilities=frozenset({"vision"}))
    decision = decide(CANARY, fx)
    assert decision.candidates == ("gpt-4o-mini",)
    assert "picked gpt-4o-mini (sticky)" in decision.reason


def test_split_without_available_arm_uses_objective() -> None:
    p = policy({"name": "s", "candidates": ["gpt-4o-mini", "llama-local"],
                "split": [{"model": "gpt-4o-mini", "weight": 1}, {"model": "llama-local", "weight": 0}]})
    decision = decide(p, facts(data_class="restricted"))
    assert decision.candidates == ("llama-local",)
    assert decision.reason == "route s: ordered, first of 1 (llama-local) (no split arm available); 1 rejected"


def test_split_with_requested_model() -> None:
    p = policy({"name": "s", "candidates": ["$requested", "llama-local"],
                "split": [{"model": "$requested", "weight": 0}, {"model": "llama-local", "weight": 5}]})
    assert decide(p, facts("gpt-4o-mini")).candidates == ("llama-local", "gpt-4o-mini")


def _key_for(model: str) -> str:
    return next(f"k{i}" for i in range(1000) if _sticky_expected(f"k{i}") == model)


# --- shadow ---------------------------------------------------------------------------------


def _shadow_policy(model: str, sample: float) -> CompiledPolicy:
    return policy({"name": "sh", "candidates": ["gpt-4o-mini"], "shadow": {"model": model, "sample": sample}})


@pytest.mark.parametrize(("sample", "low", "high"), [(0.0, 0, 0), (0.05, 0.03, 0.07), (0.5, 0.46, 0.54), (1.0, 1, 1)])
def test_shadow_sampling_rate(sample: float, low: float, high: float) -> None:
    rng = random.Random(42)
    p = _shadow_policy("claude-haiku", sample)
    shadows = [choose(facts(), CATALOG, p, rng).shadow for _ in range(2000)]
    share = shadows.count("claude-haiku") / len(shadows)
    assert low <= share <= high
    assert set(shadows) <= {"claude-haiku", None}


def test_shadow_with_seeded_rng_is_exact() -> None:
    p = _shadow_policy("claude-haiku", 0.3)
    draws = random.Random(3)
    expected = ["claude-haiku" if draws.random() < 0.3 else None for _ in range(10)]
    rng = random.Random(3)
    assert [choose(facts(), CATALOG, p, rng).shadow for _ in range(10)] == expected


@pytest.mark.parametrize(
    ("model", "fx"),
    [
        ("llama-local", facts(allowed_models=("gpt-*",))),  # filtered: allow-list
        ("claude-haiku", facts(data_class="restricted")),  # filtered: never leak past the boundary
        ("ghost", facts()),  # unknown
        ("gpt-4o-mini", facts()),  # the primary itself
    ],
)
def test_shadow_only_when_allowed(model: str, fx: Facts) -> None:
    p = policy({"name": "sh", "candidates": ["gpt-4o-mini", "llama-local"], "shadow": {"model": model, "sample": 1}})
    decision = decide(p, fx)
    assert decision.outcome == "ok" and decision.shadow is None


def test_shadow_never_joins_candidates() -> None:
    decision = decide(_shadow_policy("claude-haiku", 1.0), facts())
    assert decision.shadow == "claude-haiku" and decision.candidates == ("gpt-4o-mini",)


# --- policy tests ---------------------------------------------------------------------------


def test_facts_from_test_defaults() -> None:
    fx = facts_from_test(PolicyTest(tenant="t", model="fast", expect="x"))
    assert fx == Facts("t", "fast", "internal", 100, None, frozenset({"chat"}))


def test_run_policy_tests_reports_pass_and_fail() -> None:
    p = policy(
        {"name": "local", "when": {"data_class": ["restricted"]}, "candidates": ["llama-local"]},
        {"name": "cheap", "when": {"model": "fast"}, "objective": "cheapest",
         "candidates": ["llama-local", "gpt-4o-mini"]},
        {"name": "direct", "when": {"model": "gpt-*"}, "candidates": ["$requested"]},
        tests=[
            {"tenant": "t", "model": "fast", "expect": "llama-local"},
            {"tenant": "t", "model": "fast", "expect": "gpt-4o-mini"},
            {"tenant": "t", "model": "gpt-4o-mini", "data_class": "restricted", "expect": "llama-local"},
            {"tenant": "t", "model": "gpt-4o-mini", "expect": "gpt-4o-mini", "capabilities": ["tools"]},
            {"tenant": "t", "model": "claude-haiku", "expect": "error:model_not_found"},
            {"tenant": "t", "model": "gpt-9", "expect": "error:model_not_found"},
            {"tenant": "t", "model": "fast", "capabilities": ["tools"], "expect": "llama-local"},
            {"tenant": "t", "model": "fast", "capabilities": ["embeddings"], "expect": "error:model_not_allowed"},
            {"tenant": "t", "model": "fast", "input_tokens": 9000, "expect": "gpt-4o-mini"},
        ],
    )
    results = run_policy_tests(p, CATALOG)
    assert [(got, passed) for _, got, passed in results] == [
        ("llama-local", True),
        ("llama-local", False),
        ("llama-local", True),
        ("gpt-4o-mini", True),
        ("error:model_not_found", True),
        ("error:model_not_found", True),
        ("gpt-4o-mini", False),
        ("error:model_not_allowed", True),
        ("gpt-4o-mini", True),
    ]
    assert [test for test, _, _ in results] == p.file.tests


def test_run_policy_tests_with_tenant_facts() -> None:
    p = policy({"name": "direct", "candidates": ["$requested"]},
               tests=[{"tenant": "t", "model": "gpt-4o-mini", "expect": "error:model_not_allowed"}])

    def tenant_facts(test: PolicyTest) -> Facts:
        return replace(facts_from_test(test), allowed_models=("llama-*",))

    assert run_policy_tests(p, CATALOG)[0][1:] == ("gpt-4o-mini", False)
    assert run_policy_tests(p, CATALOG, make_facts=tenant_facts)[0][1:] == ("error:model_not_allowed", True)


def test_allow_listed_model_never_opens_its_fallbacks() -> None:
    """choose() knows a concrete model from an alias by the catalog."""
    pol = policy({"name": "r", "when": {"model": "*"}, "candidates": ["$requested", "llama-local"]})
    decision = choose(facts("gpt-4o-mini", allowed_models=("gpt-4o-mini",)), CATALOG, pol, random.Random(0))
    assert decision.candidates == ("gpt-4o-mini",)
    assert [(r.model, r.reason) for r in decision.rejected] == [("llama-local", "not in tenant allow-list")]
