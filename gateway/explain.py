"""Routing decisions without sending anything: `gateway explain` and `gateway policy test`."""
from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from gateway import tokens
from gateway.config import LoadedConfig
from gateway.parsing import _chat_capabilities
from gateway.runtime import candidate_for
from routing_policies import Candidate, Facts, PolicyTest, choose, run_policy_tests


def catalog(loaded: LoadedConfig) -> dict[str, Candidate]:
    return {name: candidate_for(m, loaded.providers[m.provider]) for name, m in loaded.models.items()}


def explain(loaded: LoadedConfig, tenant_id: str, model: str, body: dict[str, Any] | None,
            data_class: str | None = None) -> dict[str, Any]:
    tenant = loaded.tenants.get(tenant_id)
    if tenant is None:
        return {"outcome": "error", "route": "-", "chosen": None, "fallbacks": [], "rejected": [],
                "reason": f"unknown tenant {tenant_id!r}", "estimated_cost_usd": "0"}
    body = dict(body or {"messages": [{"role": "user", "content": ""}]})
    counted = tokens.estimate_chat_input(body)
    max_out = body.get("max_completion_tokens") or body.get("max_tokens")
    facts = Facts(
        tenant=tenant.id, requested_model=model, data_class=data_class or tenant.data_class,
        input_tokens=tokens.upper_bound(counted), max_output_tokens=max_out if isinstance(max_out, int) else None,
        capabilities=_chat_capabilities(body), allowed_models=tuple(tenant.allowed_models),
    )
    decision = choose(facts, catalog(loaded), loaded.policies[tenant.policy], random.Random(0))
    chosen = decision.primary
    return {
        "outcome": decision.outcome,
        "route": decision.route_label(),
        "chosen": chosen,
        "fallbacks": list(decision.candidates[1:]),
        "rejected": [{"model": r.model, "reason": r.reason} for r in decision.rejected],
        "reason": decision.reason,
        "estimated_input_tokens": facts.input_tokens,
        "estimated_cost_usd": str(decision.estimated_cost_usd.get(chosen, Decimal(0)) if chosen else 0),
    }


def run_all_policy_tests(loaded: LoadedConfig) -> Iterator[tuple[str, PolicyTest, str, bool]]:
    cat = catalog(loaded)
    for name, policy in sorted(loaded.policies.items()):
        for test, got, passed in run_policy_tests(policy, cat):
            yield name, test, got, passed
