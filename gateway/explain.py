"""Routing decisions without sending anything: `gateway explain`, `POST /admin/explain`
and `gateway policy test`.

Explain runs the same steps as a live request up to the decision: the data class (tenant,
`x-gateway-data-class`, content scan), the token estimate, the tenant's remaining budget,
observed latency and provider health, then the pure `choose`. A running gateway passes its
live state; the one-shot command reads the ledger and recent audit latency from the state
database and probes health-checked providers once.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from budgets import BudgetLimit, StoreUnavailable
from gateway import tokens
from gateway.audit import read_audit
from gateway.config import LoadedConfig, TenantConfig
from gateway.datarisk import DataClassVerdict, classify, user_hash
from gateway.errors import InvalidRequest
from gateway.health import ProviderHealth, models_by_provider, probe_now, with_health
from gateway.latency import (
    DEFAULT_WINDOW_S,
    LatencySnapshot,
    observed_latency,
    with_observed_latency,
)
from gateway.parsing import _chat_capabilities, load_json_object
from gateway.parsing_anthropic import parse_count_tokens
from gateway.pipeline import read_balance, remaining_budget
from gateway.runtime import Runtime, candidate_for
from gateway.stores import reporting_ledger
from routing_policies import (
    Candidate,
    CompiledPolicy,
    Decision,
    Facts,
    PolicyTest,
    choose,
    facts_from_test,
    max_data_class,
    run_policy_tests,
)
from routing_policies.filters import effective_p95, format_usd

BudgetLeft = tuple[Decimal | None, int | None]
log = logging.getLogger("gateway.explain")
_STATUS = {"ok": 200, "model_not_allowed": 403, "model_not_found": 404}
BODY_APIS = ("openai", "anthropic")


def catalog(loaded: LoadedConfig, *, assume_healthy: bool = False) -> dict[str, Candidate]:
    built = {name: candidate_for(m, loaded.providers[m.provider]) for name, m in loaded.models.items()}
    if assume_healthy:
        return {name: replace(c, healthy=True) for name, c in built.items()}
    return built


def explain(loaded: LoadedConfig, tenant_id: str, model: str, body: dict[str, Any] | None,
            data_class: str | None = None, *, live_catalog: Mapping[str, Candidate] | None = None,
            health: Mapping[str, ProviderHealth] | None = None,
            policies: Mapping[str, CompiledPolicy] | None = None,
            latency: Mapping[str, LatencySnapshot] | None = None,
            budget_left: BudgetLeft = (None, None), api: str | None = None) -> dict[str, Any]:
    """A running gateway passes its `live_catalog`, `health`, `policies` and `latency`; a
    one-shot command passes neither catalog nor health and health-checked providers are
    probed once here. `data_class` acts like the `x-gateway-data-class` header: it can only
    raise the tenant's class. `api` is the body's format (`openai` chat / embeddings or
    `anthropic` Messages); None detects it from the body's shape (`body_api`). A body its
    format's edge would refuse raises InvalidRequest, as the real request would get a 400."""
    tenant = loaded.tenants.get(tenant_id)
    if tenant is None:
        return {"outcome": "error", "route": "-", "chosen": None, "fallbacks": [], "rejected": [],
                "reason": f"unknown tenant {tenant_id!r}", "estimated_cost_usd": "0"}
    body = dict(body or {"messages": [{"role": "user", "content": ""}]})
    risk = classify(tenant.data_class, data_class, body)
    facts = _facts(tenant, model, body, risk, budget_left, api or body_api(body))
    if live_catalog is None:
        health = probe_now(loaded) if health is None else health
        up = {name: state.healthy for name, state in health.items()}
        static = catalog(loaded)
        live_catalog = with_health(static, models_by_provider(loaded), up, {n: c.healthy for n, c in static.items()})
        if latency:
            live_catalog = with_observed_latency(live_catalog, latency)
    policy = (policies if policies is not None else loaded.policies)[tenant.policy]
    decision = choose(facts, live_catalog, policy, random.Random(0))
    chosen = decision.primary
    return {
        "outcome": decision.outcome,
        "status": _status(decision),
        "policy": f"{policy.name}@{policy.version}",
        "route": decision.route_label(),
        "chosen": chosen,
        "fallbacks": list(decision.candidates[1:]),
        "rejected": [{"model": r.model, "reason": _detailed(loaded, r.model, r.reason, health or {})}
                     for r in decision.rejected],
        "reason": decision.reason,
        "data_class": risk.data_class,
        "data_class_reason": risk.describe(),
        "sensitive_findings": list(risk.findings),
        "estimated_input_tokens": facts.input_tokens,
        "max_output_tokens": facts.max_output_tokens,
        "estimated_cost_usd": str(decision.estimated_cost_usd.get(chosen, Decimal(0)) if chosen else 0),
        "remaining_budget_usd": None if budget_left[0] is None else _plain(budget_left[0]),
        "remaining_budget_tokens": budget_left[1],
        "shadow": decision.shadow,
        "candidates": _candidate_rows(facts, decision, policy, live_catalog, latency or {}),
    }


async def explain_live(rt: Runtime, query: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /admin/explain`: `{"tenant", "model"?, "body"?, "data_class"?, "api"?}` on live state.

    `model` defaults to the body's; `data_class` acts like the `x-gateway-data-class` header;
    `api` (`openai` | `anthropic`) is the body's format, detected from its shape when absent.
    """
    tenant_id = query.get("tenant")
    if not isinstance(tenant_id, str) or tenant_id not in rt.tenants:
        raise InvalidRequest("'tenant' must name a configured tenant", param="tenant")
    body = query.get("body")
    if body is not None and not isinstance(body, dict):
        raise InvalidRequest("'body' must be a request body object", param="body")
    model = query.get("model") or (body or {}).get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required (or a 'body' with a model)", param="model")
    data_class = query.get("data_class")
    if data_class is not None and not isinstance(data_class, str):
        raise InvalidRequest("'data_class' must be a string", param="data_class")
    api = query.get("api")
    if api is not None and api not in BODY_APIS:
        raise InvalidRequest("'api' must be 'openai' or 'anthropic'", param="api")
    left = await read_balance(rt, rt.tenants[tenant_id])
    return explain(rt.loaded, tenant_id, model, body, data_class, live_catalog=rt.catalog,
                   health=rt.health.states, policies=rt.policies, latency=rt.latency.snapshots(), budget_left=left,
                   api=api)


def read_body_file(path: str) -> dict[str, Any]:
    """`gateway explain --body FILE`: the JSON object in FILE, or InvalidRequest saying why not."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    return load_json_object(raw)


def explain_offline(loaded: LoadedConfig, tenant_id: str, model: str, body: dict[str, Any] | None,
                    data_class: str | None = None, api: str | None = None) -> dict[str, Any]:
    """`gateway explain`: live-like inputs read from the gateway's state, when there is some:
    the tenant's remaining budget from the serving ledger, and per-model latency from the
    audit records of the last latency window (what a running gateway would have observed)."""
    tenant = loaded.tenants.get(tenant_id)
    db = loaded.sqlite_path
    if tenant is None or (db is not None and not db.exists()):  # nothing served yet: no state to read
        return explain(loaded, tenant_id, model, body, data_class, api=api)
    now = datetime.now(UTC)
    latency: dict[str, LatencySnapshot] = {}
    if db is not None:
        since = now - timedelta(seconds=DEFAULT_WINDOW_S)
        latency = observed_latency(read_audit(db, since=since, kind="request", limit=-1))
    return explain(loaded, tenant_id, model, body, data_class, latency=latency,
                   budget_left=asyncio.run(_budget_left(loaded, tenant, now)), api=api)


async def _budget_left(loaded: LoadedConfig, tenant: TenantConfig, now: datetime) -> BudgetLeft:
    limits = [BudgetLimit(b.window, b.max_tokens, b.max_usd) for b in tenant.budgets]
    if not limits:
        return None, None
    try:
        async with reporting_ledger(loaded) as ledger:
            return remaining_budget(await ledger.balance(tenant.id, limits, now))
    except StoreUnavailable as exc:
        log.warning("explain: the budget store is unavailable; budgets not applied", extra={"error": str(exc)})
        return None, None


# Only the Anthropic Messages format has these: a top-level system prompt, stop_sequences,
# tools with an input_schema, tool_choice "any"/"tool", and these content block types.
_ANTHROPIC_KEYS = ("system", "stop_sequences", "top_k", "thinking")
_ANTHROPIC_BLOCKS = frozenset({"tool_use", "tool_result", "image", "document", "thinking", "redacted_thinking"})


def body_api(body: Mapping[str, Any]) -> str:
    """`anthropic` when the body has a shape only the Messages API has, else `openai`."""
    if any(key in body for key in _ANTHROPIC_KEYS):
        return "anthropic"
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" in t for t in tools):
        return "anthropic"
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool", "auto", "none") and "function" not in choice:
        return "anthropic"
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") in _ANTHROPIC_BLOCKS
                                             for b in content):
            return "anthropic"
    return "openai"


def _facts(tenant: TenantConfig, model: str, body: dict[str, Any], risk: DataClassVerdict,
           budget_left: BudgetLeft, api: str = "openai") -> Facts:
    max_out: int | None
    if api == "anthropic":  # checked and counted by the Messages edge, as a live request would be
        parsed = parse_count_tokens(orjson.dumps({**body, "model": body.get("model") or model}))
        counted, needs = parsed.input_tokens, parsed.capabilities
        raw = body.get("max_tokens")
        max_out = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else None
    elif "messages" not in body and "input" in body:  # an embeddings request
        counted, max_out, needs = tokens.estimate_embedding_input(body), 0, frozenset({"embeddings"})
    else:
        if not isinstance(body.get("messages", []), list):
            raise InvalidRequest("'messages' must be a non-empty array", param="messages")
        counted = tokens.estimate_chat_input(body)
        raw = body.get("max_completion_tokens") or body.get("max_tokens")
        max_out = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else None
        needs = _chat_capabilities(body)
    return Facts(
        tenant=tenant.id, requested_model=model, data_class=risk.data_class,
        input_tokens=tokens.upper_bound(counted), max_output_tokens=max_out, capabilities=needs,
        allowed_models=tuple(tenant.allowed_models), sticky_user=user_hash(body),
        remaining_budget_usd=budget_left[0], remaining_budget_tokens=budget_left[1],
    )


def _plain(amount: Decimal) -> str:
    return format(amount.normalize(), "f") if amount else "0"


def _status(decision: Decision) -> int:
    """The HTTP status the real request would get at the routing step."""
    if decision.refused_for_budget():
        return 429
    return _STATUS.get(decision.outcome, 403)


def _candidate_rows(facts: Facts, decision: Decision, policy: CompiledPolicy, cat: Mapping[str, Candidate],
                    latency: Mapping[str, LatencySnapshot]) -> list[dict[str, Any]]:
    """Every model the route named, in decision order: cost, latency used, and verdict."""
    route = next((r for r in policy.file.routes if r.name == decision.route), None)
    rows: list[dict[str, Any]] = []
    named: list[tuple[str, str, str | None]] = [
        (name, "chosen" if i == 0 else "fallback", None) for i, name in enumerate(decision.candidates)]
    named += [(r.model, "rejected", r.reason) for r in decision.rejected]
    for name, verdict, reason in named:
        candidate = cat.get(name)
        snap = latency.get(name)
        row: dict[str, Any] = {"model": name, "verdict": verdict, "reason": reason}
        if candidate is not None:
            row["estimated_cost_usd"] = format_usd(candidate.estimated_cost(
                facts.input_tokens, facts.max_output_tokens if facts.max_output_tokens is not None
                else candidate.max_output_tokens))
            row["data_boundary"] = candidate.data_boundary
            row["p95_latency_ms"] = effective_p95(candidate, route) if route is not None else candidate.p95_latency_ms
            row["latency_assumed"] = candidate.p95_latency_ms is None and row["p95_latency_ms"] is not None
        if snap is not None:
            row["latency"] = snap.as_dict()
        rows.append(row)
    return rows


def _detailed(loaded: LoadedConfig, model: str, reason: str, health: Mapping[str, ProviderHealth]) -> str:
    """'unhealthy' with the why: a missing key, or what the health check saw."""
    config = loaded.models.get(model)
    if reason != "unhealthy" or config is None:
        return reason
    provider = loaded.providers[config.provider]
    if provider.api_key_env and not provider.api_key():
        return f"unhealthy: ${provider.api_key_env} is not set"
    state = health.get(provider.name)
    if state is not None and not state.healthy:
        return f"unhealthy: health check GET {state.url}: {state.reason}"
    return reason


def explain_text(result: Mapping[str, Any]) -> str:
    """The human form of an explain result (the CLI without --json)."""
    lines = [f"route:      {result['route']}", f"outcome:    {result['outcome']} ({result.get('status', '-')})",
             f"chosen:     {result['chosen'] or '-'}", f"fallbacks:  {', '.join(result['fallbacks']) or '-'}",
             f"reason:     {result['reason']}"]
    if "data_class" in result:
        lines.append(f"data class: {result['data_class_reason']}")
    lines.append(f"est. cost:  ${result['estimated_cost_usd']} ({result.get('estimated_input_tokens', 0)} input "
                 f"tokens, upper bound)")
    if result.get("remaining_budget_usd") is not None or result.get("remaining_budget_tokens") is not None:
        usd = result.get("remaining_budget_usd")
        lines.append(f"budget:     {'$' + usd if usd is not None else '-'} / "
                     f"{result.get('remaining_budget_tokens') or '-'} tokens left")
    if result.get("shadow"):
        lines.append(f"shadow:     {result['shadow']}")
    if result.get("rejected"):
        lines.append("excluded:")
        lines.extend(f"  - {r['model']}: {r['reason']}" for r in result["rejected"])
    rows = result.get("candidates") or []
    if rows:
        lines.append("candidates:")
        for row in rows:
            p95 = row.get("p95_latency_ms")
            shown = "p95 -" if p95 is None else f"p95 {p95:.0f}ms{' (assumed)' if row.get('latency_assumed') else ''}"
            lines.append(f"  {row['verdict']:9} {row['model']:24} {row.get('estimated_cost_usd', '-'):>10}  {shown}")
    return "\n".join(lines)


def run_all_policy_tests(loaded: LoadedConfig) -> Iterator[tuple[str, PolicyTest, str, bool]]:
    # Policy tests describe the policy, not this shell: every provider counts as up,
    # whichever keys are set and whichever local servers are running.
    cat = catalog(loaded, assume_healthy=True)

    def make_facts(test: PolicyTest) -> Facts:
        # A configured tenant brings its allow-list and its data class (a case can only raise it).
        facts = facts_from_test(test)
        tenant = loaded.tenants.get(test.tenant)
        if tenant is None:
            return facts
        data_class = max_data_class(tenant.data_class, test.data_class) if test.data_class else tenant.data_class
        return replace(facts, data_class=data_class, allowed_models=tuple(tenant.allowed_models))

    for name, policy in sorted(loaded.policies.items()):
        for test, got, passed in run_policy_tests(policy, cat, make_facts=make_facts):
            yield name, test, got, passed
