"""FinOps reports from the ledger: spend by tenant/model/day, FOCUS CSV, unit economics, burn.

Everything is computed from `Ledger.spend` rows at tenant x model x day granularity (one
query), so the CLI, `GET /admin/spend` and the dashboard show the same numbers, and every
total is the ledger's own sum: costs stay `Decimal` end to end.

FOCUS (FinOps Open Cost and Usage Specification) export: one row per tenant x model x day x
token type. The ledger records one cost per request, so a row's `BilledCost` is that cost
split across token types in proportion to their list cost at the configured prices, the
last type taking the remainder: the rows of a (tenant, model, day) add up to the ledger's
cost exactly. `ListCost` is tokens x configured list price.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson

from budgets import BudgetLimit, Ledger, SpendRow, window_end, window_start

TOKEN_TYPES = ("input", "cached_input", "output")
FOCUS_COLUMNS = [
    "ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd", "ChargeCategory",
    "BilledCost", "EffectiveCost", "ListCost", "ListUnitPrice", "BillingCurrency",
    "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit",
    "ServiceName", "ServiceCategory", "ServiceProviderName", "ResourceId", "ResourceName", "SkuId",
    "SubAccountId", "SubAccountName", "Tags", "x_TokenType",
]
LEGACY_COLUMNS = ["requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd"]
_NANO = Decimal("1e-9")
_MTOK = Decimal(1_000_000)
_VENDORS = {"openai": "OpenAI", "anthropic": "Anthropic"}


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    tenant: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the reports need to know about a model (from the gateway config)."""

    provider: str
    provider_type: str
    upstream_model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal

    def unit_price(self, token_type: str) -> Decimal:
        return {"input": self.input_usd_per_mtok, "cached_input": self.cached_input_usd_per_mtok,
                "output": self.output_usd_per_mtok}[token_type]


def model_infos(loaded: Any) -> dict[str, ModelInfo]:
    out: dict[str, ModelInfo] = {}
    for name, m in loaded.models.items():
        provider = loaded.providers.get(m.provider)
        input_price = m.input_usd_per_mtok or Decimal(0)
        cached = m.cached_input_usd_per_mtok if m.cached_input_usd_per_mtok is not None else input_price
        out[name] = ModelInfo(m.provider, provider.type if provider else "unknown", m.upstream_model,
                              input_price, m.output_usd_per_mtok or Decimal(0), cached)
    return out


async def daily_rows(ledger: Ledger, f: Filters) -> list[SpendRow]:
    """Ledger totals per tenant x model x UTC day, filtered."""
    rows = await ledger.spend(f.since, f.until, f.tenant, ["tenant", "model", "day"])
    return [r for r in rows if f.model is None or r.group.get("model") == f.model]


def grouped(rows: Sequence[SpendRow], group_by: Sequence[str]) -> list[dict[str, Any]]:
    """Daily rows summed to `group_by` (a subset of tenant, model, day), sorted by group.

    Each request has one ledger row, on one model and day, so summing per-group request
    counts is exact."""
    totals: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        key = tuple(r.group[g] for g in group_by)
        acc = totals.setdefault(key, {**dict(zip(group_by, key)), "requests": 0, "input_tokens": 0,
                                      "output_tokens": 0, "cached_input_tokens": 0, "cost_usd": Decimal(0)})
        acc["requests"] += r.requests
        acc["input_tokens"] += r.input_tokens
        acc["output_tokens"] += r.output_tokens
        acc["cached_input_tokens"] += r.cached_input_tokens
        acc["cost_usd"] += r.cost_usd
    return [{**v, "cost_usd": str(v["cost_usd"])} for _, v in sorted(totals.items())]


def _quantity(row: SpendRow, token_type: str) -> int:
    return {"input": row.input_tokens, "cached_input": row.cached_input_tokens, "output": row.output_tokens}[token_type]


def _split(total: Decimal, weights: list[Decimal]) -> list[Decimal]:
    """`total` split in proportion to `weights` (to the nano-dollar); the parts add up exactly."""
    weight_sum = sum(weights, Decimal(0))
    if not weights:
        return []
    if weight_sum == 0:
        return [total] + [Decimal(0)] * (len(weights) - 1)
    parts = [(total * w / weight_sum).quantize(_NANO, rounding=ROUND_HALF_EVEN) for w in weights[:-1]]
    return [*parts, total - sum(parts, Decimal(0))]


def _money(value: Decimal) -> str:
    return f"{value.quantize(_NANO, rounding=ROUND_HALF_EVEN):f}"


def focus_rows(rows: Sequence[SpendRow], models: Mapping[str, ModelInfo]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for r in rows:
        tenant, model, day = r.group["tenant"], r.group["model"], r.group["day"]
        info = models.get(model) or ModelInfo("unknown", "unknown", model, Decimal(0), Decimal(0), Decimal(0))
        types = [t for t in TOKEN_TYPES if _quantity(r, t) > 0] or (["input"] if r.cost_usd else [])
        list_costs = [Decimal(_quantity(r, t)) * info.unit_price(t) / _MTOK for t in types]
        billed = _split(r.cost_usd, list_costs)
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        month = start.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        for token_type, list_cost, cost in zip(types, list_costs, billed):
            qty = _quantity(r, token_type)
            out.append({
                "ChargePeriodStart": _ts(start), "ChargePeriodEnd": _ts(start + timedelta(days=1)),
                "BillingPeriodStart": _ts(month), "BillingPeriodEnd": _ts(next_month), "ChargeCategory": "Usage",
                "BilledCost": _money(cost), "EffectiveCost": _money(cost), "ListCost": _money(list_cost),
                "ListUnitPrice": f"{info.unit_price(token_type):f}", "BillingCurrency": "USD",
                "ConsumedQuantity": str(qty), "ConsumedUnit": "Tokens",
                "PricingQuantity": f"{(Decimal(qty) / _MTOK):f}", "PricingUnit": "1M Tokens",
                "ServiceName": info.provider, "ServiceCategory": "AI and Machine Learning",
                "ServiceProviderName": _VENDORS.get(info.provider_type, info.provider),
                "ResourceId": model, "ResourceName": info.upstream_model,
                "SkuId": f"{info.upstream_model}:{token_type}",
                "SubAccountId": tenant, "SubAccountName": tenant,
                "Tags": orjson.dumps({"gateway.model": model, "gateway.token_type": token_type}).decode(),
                "x_TokenType": token_type,
            })
    return out


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def to_csv(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def unit_economics(rows: Sequence[SpendRow]) -> list[dict[str, Any]]:
    """Per tenant x model: cost per 1k requests and tokens per request."""
    out = []
    for g in grouped(rows, ["tenant", "model"]):
        requests = g["requests"]
        tokens = g["input_tokens"] + g["cached_input_tokens"] + g["output_tokens"]
        cost = Decimal(g["cost_usd"])
        out.append({
            "tenant": g["tenant"], "model": g["model"], "requests": requests, "tokens": tokens,
            "cost_usd": g["cost_usd"],
            "cost_per_1k_requests_usd": _money(cost * 1000 / requests) if requests else "0",
            "tokens_per_request": str((Decimal(tokens) / requests).quantize(Decimal("0.1"))) if requests else "0",
        })
    return out


async def budget_burn(ledger: Ledger, tenants: Mapping[str, Sequence[BudgetLimit]], now: datetime,
                      tenant: str | None = None) -> list[dict[str, Any]]:
    """Spent vs limit in each capped window now, and when the current rate would exhaust it."""
    out: list[dict[str, Any]] = []
    for tenant_id, limits in sorted(tenants.items()):
        if tenant is not None and tenant_id != tenant:
            continue
        for limit in limits:
            start, end = window_start(limit.window, now), window_end(limit.window, now)
            spent_usd, spent_tokens = await _spent(ledger, tenant_id, start, now)
            # The rate: over the window so far, or the last 7 days for the open-ended `total`.
            rate_from = start or now - timedelta(days=7)
            rate_usd, rate_tokens = (spent_usd, spent_tokens) if start else await _spent(ledger, tenant_id, rate_from, now)
            elapsed = max((now - rate_from).total_seconds(), 1.0)
            for kind, cap, spent, rated in (("usd", limit.max_usd, spent_usd, rate_usd),
                                            ("tokens", limit.max_tokens, Decimal(spent_tokens), Decimal(rate_tokens))):
                if cap is not None:
                    out.append(_burn(tenant_id, limit.window, kind, Decimal(cap), spent, rated, elapsed, now, start, end))
    return out


async def _spent(ledger: Ledger, tenant: str, since: datetime | None, now: datetime) -> tuple[Decimal, int]:
    rows = await ledger.spend(since, now + timedelta(seconds=1), tenant, [])
    if not rows:
        return Decimal(0), 0
    r = rows[0]
    return r.cost_usd, r.input_tokens + r.cached_input_tokens + r.output_tokens


def _burn(tenant: str, window: str, kind: str, cap: Decimal, spent: Decimal, rated: Decimal, elapsed_s: float,
          now: datetime, start: datetime | None, end: datetime | None) -> dict[str, Any]:
    remaining = max(cap - spent, Decimal(0))
    per_day = rated * Decimal(86400) / Decimal(str(elapsed_s))
    exhausts: datetime | None = None
    if remaining == 0:
        exhausts = now
    elif per_day > 0:
        exhausts = now + timedelta(days=float(remaining / per_day))
    fmt = _money if kind == "usd" else (lambda d: str(int(d)))
    return {
        "tenant": tenant, "window": window, "kind": kind, "limit": fmt(cap), "spent": fmt(spent),
        "remaining": fmt(remaining), "used_pct": round(float(spent / cap * 100), 1) if cap else 100.0,
        "window_start": _ts(start) if start else None, "window_end": _ts(end) if end else None,
        "rate_per_day": fmt(per_day),
        "exhausts_on": exhausts.date().isoformat() if exhausts else None,
        "exhausts_within_window": bool(exhausts and (end is None or exhausts < end)),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def request_summary(stats: Sequence[tuple[str, str | None, str | None, int, float, str]]) -> dict[str, Any]:
    """Requests and error rate per day, p95 latency per model, from audit request records."""
    per_day: dict[str, list[int]] = {}
    latencies: dict[str, list[float]] = {}
    for ts, _tenant, model, status, latency_ms, outcome in stats:
        day = per_day.setdefault(ts[:10], [0, 0])
        day[0] += 1
        if status >= 400 or outcome not in ("ok", ""):
            day[1] += 1
        elif model:
            latencies.setdefault(model, []).append(latency_ms)
    total = sum(d[0] for d in per_day.values())
    errors = sum(d[1] for d in per_day.values())
    return {
        "requests": total, "errors": errors, "error_rate": round(errors / total, 4) if total else 0.0,
        "days": [{"day": day, "requests": n, "errors": e, "error_rate": round(e / n, 4)}
                 for day, (n, e) in sorted(per_day.items())],
        "p95_latency_ms": [{"model": m, "p95_ms": round(percentile(v, 95), 1), "samples": len(v)}
                           for m, v in sorted(latencies.items())],
    }
