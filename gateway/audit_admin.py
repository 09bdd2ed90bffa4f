"""Admin actions as audit records: keys, policy versions, budgets.

Policies and budgets change by editing files, so the gateway records what it runs: at
start it compares each policy file's SHA-256 and each tenant's budgets with the last
recorded snapshot (`config.loaded`) and writes `policy.loaded` / `policy.reloaded` /
`budget.changed` records for what differs; a hot reload writes `policy.reloaded`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.audit import AuditRecord, admin_record, file_sha256
from routing_policies import CompiledPolicy

if TYPE_CHECKING:
    from gateway.config import LoadedConfig
    from gateway.runtime import Runtime

SNAPSHOT = "config.loaded"


def policy_hashes(policies: dict[str, CompiledPolicy]) -> dict[str, dict[str, str | None]]:
    return {name: {"version": p.version, "sha256": file_sha256(p.source_path), "file": p.source_path}
            for name, p in sorted(policies.items())}


def budget_snapshot(loaded: LoadedConfig) -> dict[str, list[dict[str, Any]]]:
    return {t.id: [b.model_dump(mode="json") for b in t.budgets] for t in loaded.config.tenants}


def config_change_records(previous: dict[str, Any] | None, policies: dict[str, dict[str, str | None]],
                          budgets: dict[str, list[dict[str, Any]]], *, source: str) -> list[AuditRecord]:
    """What changed since the last snapshot (everything, the first time), plus a new snapshot."""
    before_policies: dict[str, Any] = (previous or {}).get("policies", {})
    before_budgets: dict[str, Any] = (previous or {}).get("budgets", {})
    records: list[AuditRecord] = []
    for name, now in policies.items():
        old = before_policies.get(name)
        if old is None or old.get("sha256") != now["sha256"]:
            action = "policy.loaded" if previous is None or old is None else "policy.reloaded"
            records.append(admin_record(action, actor=source, details={"policy": name, **now,
                                        "previous_sha256": old.get("sha256") if old else None}))
    for name in sorted(set(before_policies) - set(policies)):
        records.append(admin_record("policy.removed", actor=source, details={"policy": name}))
    for tenant, limits in budgets.items():
        if previous is not None and before_budgets.get(tenant) != limits:
            records.append(admin_record("budget.changed", tenant=tenant, actor=source,
                                        details={"before": before_budgets.get(tenant), "after": limits}))
    if previous is None or records:
        records.append(admin_record(SNAPSHOT, actor=source, details={"policies": policies, "budgets": budgets}))
    return records


async def record_config_changes(rt: Runtime, source: str = "startup") -> None:
    previous = await rt.audit.last_action(SNAPSHOT)
    records = config_change_records(previous["details"] if previous else None, policy_hashes(rt.policies),
                                    budget_snapshot(rt.loaded), source=source)
    for record in records:
        rt.audit.write(record)
