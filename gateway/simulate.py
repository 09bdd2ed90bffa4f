"""`gateway policy simulate`: what a policy change would do to recorded traffic.

Each audit record keeps the features routing used (tenant, requested model, data class
after the content scan, capabilities, token estimates, key id for sticky splits) and
never the prompt, so the recorded requests can be routed again under a new policy:

- a request *moves* when the new primary differs from the recorded primary;
- cost is repriced from the recorded token usage at the new model's prices; the delta
  covers requests served both before and after (newly refused or newly admitted ones are
  counted apart: their cost cannot be compared);
- expected latency maps each moved request onto the new model's observed distribution at
  the same quantile it had on its old model (a slow request stays slow), then takes the
  p95 over all requests. A model without observed traffic has no latency to map to.

Budgets are not replayed (the remaining budget at the time is not recorded), and latency
filters see the latency observed over the replayed window.
"""
from __future__ import annotations

import bisect
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from budgets import cost
from gateway.audit import read_audit
from gateway.config import LoadedConfig
from gateway.latency import (
    DEFAULT_MIN_SAMPLES,
    latency_samples,
    percentile,
    snapshot_of,
    with_observed_latency,
)
from gateway.runtime import candidate_for, price_for
from routing_policies import (
    CompiledPolicy,
    Facts,
    SourceError,
    check_references,
    choose,
    load_policy,
)

__all__ = ["Replay", "Summary", "iter_audit_file", "iter_audit_records", "render_table", "run_simulation",
           "simulate"]

_ROUTE_LABEL = re.compile(r"^(?P<policy>.*)@(?P<version>[0-9a-f]+):(?P<route>.*)$")
REFUSED = "(refused)"


def iter_audit_records(db_path: Path, since: datetime | None = None,
                       until: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Request audit records from the state database, oldest first, `since <= ts < until`."""
    yield from read_audit(db_path, since=since, until=until, kind="request", limit=-1)


def iter_audit_file(path: Path, since: datetime | None = None, until: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Audit records from a JSON-lines export (`gateway audit --format jsonl`)."""
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = orjson.loads(line)
            ts = datetime.fromisoformat(record["ts"])
            if (since is None or ts >= since) and (until is None or ts < until):
                yield record


@dataclass(frozen=True)
class Replay:
    """One recorded request and where the new policy would send it."""

    tenant: str
    old: str  # recorded primary, or REFUSED
    new: str  # new primary, or REFUSED
    served: str | None
    old_cost: Decimal
    new_cost: Decimal
    old_latency_ms: float | None
    new_latency_ms: float | None

    @property
    def moved(self) -> bool:
        return self.old != self.new


@dataclass
class Summary:
    requests: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    cost_before: Decimal = Decimal(0)
    cost_after: Decimal = Decimal(0)
    newly_refused: int = 0
    newly_admitted: int = 0
    latency_before: list[float] = field(default_factory=list)
    latency_after: list[float] = field(default_factory=list)
    latency_unknown: int = 0

    def add(self, replay: Replay) -> None:
        self.requests += 1
        if replay.moved:
            self.moves[(replay.old, replay.new)] += 1
        if replay.old != REFUSED and replay.new == REFUSED:
            self.newly_refused += 1
        elif replay.old == REFUSED and replay.new != REFUSED:
            self.newly_admitted += 1
        elif replay.old != REFUSED:
            self.cost_before += replay.old_cost
            self.cost_after += replay.new_cost
        if replay.old_latency_ms is not None and replay.new != REFUSED:
            if replay.new_latency_ms is None:
                self.latency_unknown += 1
            else:
                self.latency_before.append(replay.old_latency_ms)
                self.latency_after.append(replay.new_latency_ms)

    def as_dict(self) -> dict[str, Any]:
        delta = self.cost_after - self.cost_before
        pct = None if self.cost_before == 0 else round(float(delta / self.cost_before * 100), 2)
        before = percentile(sorted(self.latency_before), 0.95) if self.latency_before else None
        after = percentile(sorted(self.latency_after), 0.95) if self.latency_after else None
        return {
            "requests": self.requests,
            "moved": sum(self.moves.values()),
            "moves": [{"from": old, "to": new, "count": n}
                      for (old, new), n in sorted(self.moves.items(), key=lambda item: (-item[1], item[0]))],
            "cost_before_usd": _plain(self.cost_before),
            "cost_after_usd": _plain(self.cost_after),
            "cost_delta_usd": _plain(delta),
            "cost_delta_pct": pct,
            "p95_before_ms": before,
            "p95_after_ms": after,
            "p95_delta_ms": None if before is None or after is None else round(after - before, 1),
            "latency_unknown": self.latency_unknown,
            "newly_refused": self.newly_refused,
            "newly_admitted": self.newly_admitted,
        }


def load_candidate_policy(loaded: LoadedConfig, path: str | Path) -> CompiledPolicy:
    policy = load_policy(path)
    errors = check_references(policy, policy.doc, set(loaded.models))
    if errors:
        raise SourceError(errors)
    return policy


def simulate(loaded: LoadedConfig, policy: CompiledPolicy, records: Iterable[Mapping[str, Any]],
             *, seed: int = 0) -> dict[str, Any]:
    """Replay `records` decided by a policy named like `policy` under `policy` instead."""
    records = list(records)
    samples, ttfts = latency_samples(records)
    latency = {model: snapshot_of(values, ttfts.get(model, []), DEFAULT_MIN_SAMPLES) for model, values in samples.items()}
    static = {name: replace(candidate_for(m, loaded.providers[m.provider]), healthy=True)
              for name, m in loaded.models.items()}
    cat = with_observed_latency(static, latency)
    kept = [r for r in records if _replayable(r, policy.name)]
    prices = {name: price_for(m) for name, m in loaded.models.items()}
    rng = random.Random(seed)
    total, per_tenant = Summary(), defaultdict[str, Summary](Summary)
    for record in kept:
        replay = _replay(loaded, policy, cat, prices, samples, record, rng)
        total.add(replay)
        per_tenant[replay.tenant].add(replay)
    return {
        "policy": f"{policy.name}@{policy.version}",
        "total": total.as_dict(),
        "tenants": {tenant: summary.as_dict() for tenant, summary in sorted(per_tenant.items())},
        "models": {model: snap.as_dict() for model, snap in sorted(latency.items())},
    }


def _replayable(record: Mapping[str, Any], policy_name: str) -> bool:
    features = record.get("features") or {}
    if features.get("shadow") is True or not record.get("tenant") or not record.get("model_requested"):
        return False
    match = _ROUTE_LABEL.match(record.get("route") or "")
    return match is not None and match["policy"] == policy_name


def _replay(loaded: LoadedConfig, policy: CompiledPolicy, cat: Mapping[str, Any], prices: Mapping[str, Any],
            samples: Mapping[str, list[float]], record: Mapping[str, Any], rng: random.Random) -> Replay:
    features = record.get("features") or {}
    tenant = loaded.tenants.get(record["tenant"])
    max_out = features.get("max_output_tokens")
    facts = Facts(
        tenant=record["tenant"],
        requested_model=record["model_requested"],
        data_class=record.get("data_class") or (tenant.data_class if tenant else "internal"),
        input_tokens=int(features.get("input_tokens_bound") or record.get("estimated_input_tokens") or 0),
        max_output_tokens=max_out if isinstance(max_out, int) else None,
        capabilities=frozenset(features.get("capabilities") or ["chat"]),
        allowed_models=tuple(tenant.allowed_models) if tenant else ("*",),
        sticky_key=record.get("key_id") or "",
        sticky_user=str(features.get("sticky_user") or ""),
    )
    decision = choose(facts, cat, policy, rng)
    recorded = features.get("candidates") or []
    old = recorded[0] if recorded else REFUSED
    new = decision.primary or REFUSED
    served = record.get("model_served")
    old_cost = Decimal(str(record.get("cost_usd") or "0"))
    new_cost = old_cost
    if new != old and new != REFUSED and new in prices:
        new_cost = cost(prices[new], int(record.get("input_tokens") or 0), int(record.get("output_tokens") or 0),
                        int(record.get("cached_input_tokens") or 0))
    old_latency = float(record["latency_ms"]) if served and record.get("outcome") == "ok" else None
    new_latency = old_latency
    if old_latency is not None and new != old:
        new_latency = _mapped_latency(samples.get(served or "", []), samples.get(new, []), old_latency)
    return Replay(record["tenant"], old, new, served, old_cost, new_cost, old_latency, new_latency)


def _mapped_latency(old_samples: list[float], new_samples: list[float], value: float) -> float | None:
    """The new model's latency at the quantile `value` had among the old model's samples."""
    if not new_samples:
        return None
    if not old_samples:
        return percentile(new_samples, 0.5)
    q = bisect.bisect_right(old_samples, value) / len(old_samples)
    return percentile(new_samples, min(1.0, max(q, 1 / len(new_samples))))


def render_table(report: Mapping[str, Any]) -> str:
    lines = [f"policy {report['policy']}"]
    sections = [("total", report["total"])] + [(f"tenant {t}", s) for t, s in report["tenants"].items()]
    for title, s in sections:
        pct = "-" if s["cost_delta_pct"] is None else f"{s['cost_delta_pct']:+.2f}%"
        p95 = (f"{_ms(s['p95_before_ms'])} -> {_ms(s['p95_after_ms'])}"
               + ("" if s["p95_delta_ms"] is None else f" ({s['p95_delta_ms']:+.0f}ms)"))
        lines += [
            "",
            f"{title}: {s['requests']} requests, {s['moved']} would move",
            f"  cost:  ${s['cost_before_usd']} -> ${s['cost_after_usd']}  delta ${s['cost_delta_usd']} ({pct})",
            f"  p95:   {p95}" + (f"  ({s['latency_unknown']} moved to models without latency data)"
                                 if s["latency_unknown"] else ""),
        ]
        if s["newly_refused"] or s["newly_admitted"]:
            lines.append(f"  newly refused: {s['newly_refused']}, newly admitted: {s['newly_admitted']}")
        lines += [f"  {m['from']} -> {m['to']}: {m['count']}" for m in s["moves"]]
    if report["models"]:
        lines += ["", "observed latency (window replayed):"]
        lines += [f"  {model}: {m['samples']} requests, p50 {_ms(m['p50_ms'])}, p95 {_ms(m['p95_ms'])}"
                  for model, m in report["models"].items()]
    return "\n".join(lines)


def _plain(amount: Decimal) -> str:
    """Exact, without trailing zeros or an exponent: `0.018`, `-0.016`, `0`."""
    return format(amount.normalize(), "f") if amount else "0"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def run_simulation(loaded: LoadedConfig, policy_path: str, *, since: datetime | None, until: datetime | None,
                   audit_file: str | None = None, fmt: str = "table") -> str:
    """`gateway policy simulate`: the report as text (table or JSON)."""
    policy = load_candidate_policy(loaded, policy_path)
    if audit_file:
        records: Iterable[Mapping[str, Any]] = iter_audit_file(Path(audit_file), since, until)
    elif loaded.sqlite_path is not None and loaded.sqlite_path.exists():
        records = iter_audit_records(loaded.sqlite_path, since, until)
    elif loaded.sqlite_path is None:  # PostgreSQL: gateway.db.connect takes the URL
        records = iter_audit_records(loaded.database, since, until)  # type: ignore[arg-type]
    else:
        records = []
    report = simulate(loaded, policy, records)
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    return render_table(report)
