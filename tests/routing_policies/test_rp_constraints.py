"""Budget and latency as routing inputs: the over-budget filter, unobserved-latency settings,
decision fields that survive a reload, and the policy-file side of both.

Tables read `(facts, candidates, policy) -> (model, rejections)`.
"""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from routing_policies import filters as f
from routing_policies.engine import (
    catalog_for_test,
    choose,
    facts_from_test,
    run_policy_tests,
)
from routing_policies.model import Candidate, Decision, Facts, Rejected
from routing_policies.policy import (
    PolicyFile,
    PolicyTest,
    Route,
    check_references,
    compile_policy,
    parse_policy,
)
from routing_policies.yamlsource import SourceError
from tests.routing_policies.test_rp_engine import CATALOG, HAIKU, LLAMA, MINI, facts

# LLAMA p95 4100ms, MINI p95 900ms, HAIKU unobserved.


def policy(*routes: dict[str, Any], **top: Any) -> Any:
    return compile_policy(PolicyFile.model_validate({"name": "p", "routes": list(routes), **top}), version="abc123")


def decide(p: Any, fx: Facts, catalog: dict[str, Candidate] = CATALOG) -> Decision:
    return choose(fx, catalog, p, random.Random(0))


def route(**fields: Any) -> Route:
    data: dict[str, Any] = {"name": "r", "candidates": ["llama-local", "gpt-4o-mini", "claude-haiku"]}
    return Route.model_validate(data | fields)


# --- over budget -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fx", "candidate", "reason"),
    [
        (facts(), MINI, None),  # uncapped
        # 1000 in + 500 out on gpt-4o-mini = $0.00045
        (facts(remaining_budget_usd=Decimal("0.00045")), MINI, None),  # exactly what is left
        (facts(remaining_budget_usd=Decimal("0.0004")), MINI, "over budget (est. $0.00045 > $0.0004 left)"),
        (facts(remaining_budget_usd=Decimal(0)), LLAMA, None),  # free model, empty budget
        (facts(remaining_budget_tokens=1500), MINI, None),
        (facts(remaining_budget_tokens=1499), MINI, "over budget (1500 tokens > 1499 left)"),
        # No max_tokens from the client: the worst case is the model's max output.
        (facts(max_output_tokens=None, remaining_budget_tokens=5000), MINI, "over budget (17384 tokens > 5000 left)"),
    ],
)
def test_budget_filter(fx: Facts, candidate: Candidate, reason: str | None) -> None:
    assert f.budget(fx, candidate, route()) == reason


def test_over_budget_candidates_drop_to_cheaper_ones() -> None:
    p = policy({"name": "smart", "candidates": ["claude-haiku", "gpt-4o-mini", "llama-local"]})
    decision = decide(p, facts(model="x", remaining_budget_usd=Decimal("0.001")))
    # haiku: 1000 * 0.8 + 500 * 4 = $0.0028 > $0.001; mini $0.00045 fits.
    assert decision.candidates == ("gpt-4o-mini", "llama-local")
    assert decision.rejected == (Rejected("claude-haiku", "over budget (est. $0.0028 > $0.0010 left)"),)
    assert not decision.refused_for_budget()


def test_refused_for_budget_only_when_budget_is_why() -> None:
    p = policy({"name": "hosted", "candidates": ["gpt-4o-mini", "claude-haiku"]})
    broke = decide(p, facts(model="x", remaining_budget_usd=Decimal(0)))
    assert broke.outcome == "model_not_allowed" and broke.refused_for_budget()
    # Confidential: mini is out for its boundary, haiku for budget: still a budget refusal.
    mixed = decide(p, facts(model="x", data_class="confidential", remaining_budget_usd=Decimal(0)))
    assert [r.reason.split(" (")[0] for r in mixed.rejected] == [
        "data_class=confidential: boundary vendor not allowed", "over budget"]
    assert mixed.refused_for_budget()
    boundary_only = decide(p, facts(model="x", data_class="restricted"))
    assert boundary_only.outcome == "model_not_allowed" and not boundary_only.refused_for_budget()


def test_budget_is_checked_after_the_other_filters() -> None:
    # A candidate excluded for its boundary reports the boundary, not the budget.
    fx = facts(data_class="restricted", remaining_budget_usd=Decimal(0))
    assert f.all_of()(fx, MINI, route()) == "data_class=restricted: boundary vendor not allowed"


# --- unobserved latency ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "require", "objective", "reason"),
    [
        ("allow", {"max_p95_latency_ms": 1000}, "ordered", None),
        (None, {"max_p95_latency_ms": 1000}, "ordered", None),  # a bare Route: allow
        ("reject", {"max_p95_latency_ms": 1000}, "ordered", "p95 unknown (no latency data yet)"),
        ("reject", {}, "fastest", "p95 unknown (no latency data yet)"),
        ("reject", {}, "weighted", "p95 unknown (no latency data yet)"),
        ("reject", {}, "cheapest", None),  # the route does not use latency
        (800, {"max_p95_latency_ms": 1000}, "ordered", None),
        (2500, {"max_p95_latency_ms": 1000}, "ordered", "p95 2500ms (assumed) > 1000ms"),
    ],
)
def test_unknown_latency_settings(setting: Any, require: dict[str, Any], objective: str, reason: str | None) -> None:
    rt = route(require=require, objective=objective, unknown_latency=setting)
    assert f.latency(facts(), HAIKU, rt) == reason
    # Observed models are judged on what was observed, whatever the setting.
    assert f.latency(facts(), MINI, rt) is None


def test_policy_wide_unknown_latency_is_inherited_by_routes() -> None:
    p = policy(
        {"name": "a", "when": {"model": "a"}, "candidates": ["claude-haiku", "gpt-4o-mini"], "objective": "fastest"},
        {"name": "b", "when": {"model": "b"}, "candidates": ["claude-haiku", "gpt-4o-mini"], "objective": "fastest",
         "unknown_latency": "allow"},
        unknown_latency=500,
    )
    assert [r.unknown_latency for r in p.routes] == [500, "allow"]
    # Assumed 500ms beats mini's observed 900ms; with `allow` the unobserved model ranks last.
    assert decide(p, facts(model="a")).candidates == ("claude-haiku", "gpt-4o-mini")
    assert decide(p, facts(model="b")).candidates == ("gpt-4o-mini", "claude-haiku")
    assert "fastest of 2 (claude-haiku p95 500ms assumed)" in decide(p, facts(model="a")).reason


def test_weighted_uses_assumed_latency() -> None:
    slow_cheap = replace(LLAMA, p95_latency_ms=None)
    cat = {"llama-local": slow_cheap, "gpt-4o-mini": MINI}
    p = policy({"name": "w", "candidates": ["llama-local", "gpt-4o-mini"], "objective": "weighted",
                "weights": {"cost": 0.2, "latency": 0.8}, "unknown_latency": 5000})
    assert decide(p, facts(model="x"), cat).primary == "gpt-4o-mini"
    p = policy({"name": "w", "candidates": ["llama-local", "gpt-4o-mini"], "objective": "weighted",
                "weights": {"cost": 0.2, "latency": 0.8}, "unknown_latency": 100})
    assert decide(p, facts(model="x"), cat).primary == "llama-local"


def test_latency_ceiling_with_live_numbers() -> None:
    p = policy({"name": "cheap-chat", "candidates": ["llama-local", "gpt-4o-mini"], "objective": "cheapest",
                "require": {"max_p95_latency_ms": 3000}})
    decision = decide(p, facts(model="x"))
    assert decision.candidates == ("gpt-4o-mini",)
    assert decision.rejected == (Rejected("llama-local", "p95 4100ms > 3000ms"),)
    recovered = {**CATALOG, "llama-local": replace(LLAMA, p95_latency_ms=1200.0)}
    assert decide(p, facts(model="x"), recovered).candidates == ("llama-local", "gpt-4o-mini")


# --- decision fields a request keeps across a reload ---------------------------------------------


def test_decision_carries_route_settings() -> None:
    p = policy({"name": "r", "candidates": ["llama-local", "gpt-4o-mini"], "max_attempts": 5,
                "shadow": {"model": "gpt-4o-mini", "sample": 1.0, "account": "evals"}})
    decision = decide(p, facts(model="x"))
    assert decision.max_attempts == 5
    assert decision.shadow == "gpt-4o-mini" and decision.shadow_account == "evals"
    default_account = policy({"name": "r", "candidates": ["llama-local"],
                              "shadow": {"model": "gpt-4o-mini", "sample": 1.0}})
    assert decide(default_account, facts(model="x")).shadow_account == "shadow"
    assert decide(policy({"name": "r", "candidates": ["llama-local"]}), facts(model="x")).max_attempts == 3


def test_confidential_request_is_never_shadowed_to_a_vendor() -> None:
    p = policy({"name": "r", "candidates": ["llama-local"], "shadow": {"model": "gpt-4o-mini", "sample": 1.0}})
    assert decide(p, facts(model="x")).shadow == "gpt-4o-mini"
    confidential = decide(p, facts(model="x", data_class="confidential"))
    assert confidential.primary == "llama-local" and confidential.shadow is None and confidential.shadow_account is None


# --- policy tests: assumed latency and budget --------------------------------------------------


def test_policy_tests_can_assume_latency_and_budget() -> None:
    p = policy(
        {"name": "fast", "when": {"model": "fast"}, "candidates": ["llama-local", "gpt-4o-mini"],
         "objective": "ordered", "require": {"max_p95_latency_ms": 3000}},
        tests=[
            {"tenant": "t", "model": "fast", "expect": "llama-local", "p95_latency_ms": {"llama-local": 800}},
            {"tenant": "t", "model": "fast", "expect": "gpt-4o-mini", "p95_latency_ms": {"llama-local": 4100}},
            {"tenant": "t", "model": "fast", "expect": "error:model_not_allowed", "remaining_budget_usd": 0,
             "p95_latency_ms": {"llama-local": 4100}},
        ],
    )
    unobserved = {name: replace(c, p95_latency_ms=None) for name, c in CATALOG.items()}
    results = run_policy_tests(p, unobserved)
    assert [(got, passed) for _, got, passed in results] == [
        ("llama-local", True), ("gpt-4o-mini", True), ("error:model_not_allowed", True)]
    case = p.file.tests[2]
    assert facts_from_test(case).remaining_budget_usd == Decimal(0)
    assert catalog_for_test(case, unobserved)["llama-local"].p95_latency_ms == 4100
    assert catalog_for_test(p.file.tests[0], unobserved) is not unobserved
    no_overrides = PolicyTest(tenant="t", model="fast", expect="llama-local")
    assert catalog_for_test(no_overrides, unobserved) is unobserved


# --- the policy file ---------------------------------------------------------------------------


def test_unknown_latency_and_shadow_account_in_yaml() -> None:
    text = """\
name: p
unknown_latency: reject
routes:
  - name: r
    when: {model: "*"}
    candidates: [llama-local]
    unknown_latency: 1500
    shadow: {model: gpt-4o-mini, sample: 0.1, account: evals}
tests:
  - {tenant: t, model: m, expect: llama-local, p95_latency_ms: {ghost: 10}}
"""
    p = parse_policy(text, "p.yaml")
    assert p.file.unknown_latency == "reject" and p.routes[0].unknown_latency == 1500
    assert p.routes[0].shadow is not None and p.routes[0].shadow.account == "evals"
    assert check_references(p, None, {"llama-local", "gpt-4o-mini"}) == [
        "p.yaml:10: test 1 p95_latency_ms: unknown model 'ghost'"]


@pytest.mark.parametrize(
    ("snippet", "line", "message"),
    [
        ("    unknown_latency: sometimes\n", 5, "unknown_latency"),
        ("    unknown_latency: -5\n", 5, "unknown_latency"),
        ("    shadow: {model: b, sample: 0.5, account: ''}\n", 5, "shadow.account"),
    ],
)
def test_bad_settings_report_file_and_line(snippet: str, line: int, message: str) -> None:
    text = "name: p\nroutes:\n  - name: r\n    candidates: [a]\n" + snippet
    with pytest.raises(SourceError) as info:
        parse_policy(text, "bad.yaml")
    assert any(e.startswith(f"bad.yaml:{line}: ") and message in e for e in info.value.errors), info.value.errors


# --- splits sticky per user ----------------------------------------------------------------------


def test_split_sticky_per_user_ignores_the_key() -> None:
    p = policy({"name": "canary", "candidates": ["gpt-4o-mini", "claude-haiku"], "sticky": "user",
                "split": [{"model": "gpt-4o-mini", "weight": 50}, {"model": "claude-haiku", "weight": 50}]})
    for user in ("u1", "u2", "u3", "u4"):
        picks = {decide(p, facts(model="x", sticky_key=f"key-{k}", sticky_user=user)).primary for k in range(20)}
        assert len(picks) == 1  # one user, one arm, whatever key it comes with
    arms = {decide(p, facts(model="x", sticky_user=f"user-{i}")).primary for i in range(40)}
    assert arms == {"gpt-4o-mini", "claude-haiku"}
    assert "(sticky per user)" in decide(p, facts(model="x", sticky_user="u1")).reason
    # No user on the request: sticky per key instead.
    keyed = {decide(p, facts(model="x", sticky_key="key-1"), ).primary for _ in range(10)}
    assert len(keyed) == 1 and "(sticky)" in decide(p, facts(model="x", sticky_key="key-1")).reason
