"""`gateway spend`, `gateway audit` and `gateway audit verify` (the CLI side of FinOps and audit)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway import audit_store, finops
from gateway.config import LoadedConfig


def parse_date(value: str | None, *, end: bool = False) -> datetime | None:
    """ISO date or datetime (UTC when no zone); a bare `--until` date includes that whole day."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if end and len(value) == 10:
        parsed += timedelta(days=1)
    return parsed


def budget_limits(loaded: LoadedConfig) -> dict[str, tuple[Any, ...]]:
    from budgets import BudgetLimit

    return {t.id: tuple(BudgetLimit(b.window, b.max_tokens, b.max_usd) for b in t.budgets)
            for t in loaded.config.tenants if t.budgets}


def render_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in records]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "") if r.get(c) is not None else "-").ljust(widths[c]) for c in columns)
              for r in records]
    return "\n".join(lines)


async def spend_report(ledger: Any, loaded: LoadedConfig, filters: finops.Filters, group_by: Sequence[str],
                       now: datetime) -> dict[str, Any]:
    """Everything `gateway spend` and `GET /admin/spend` show, from one ledger query (plus burn)."""
    rows = await finops.daily_rows(ledger, filters)
    return {
        "rows": rows,
        "data": finops.grouped(rows, group_by),
        "unit_economics": finops.unit_economics(rows),
        "budget_burn": await finops.budget_burn(ledger, budget_limits(loaded), now, filters.tenant),
    }


def is_focus(group_by: Sequence[str]) -> bool:
    """CSV is FOCUS at full granularity (the default `--by`); a coarser --by keeps the grouped columns."""
    return set(group_by) == {"tenant", "model", "day"}


def spend_csv(report: dict[str, Any], loaded: LoadedConfig, group_by: Sequence[str]) -> str:
    if is_focus(group_by):
        return finops.to_csv(finops.focus_rows(report["rows"], finops.model_infos(loaded)), finops.FOCUS_COLUMNS)
    return finops.to_csv(report["data"], [*group_by, *finops.LEGACY_COLUMNS])


def spend_command(loaded: LoadedConfig, *, by: str, fmt: str, tenant: str | None, model: str | None,
                  since: str | None, until: str | None) -> int:
    from gateway import stores

    group_by = [g for g in by.split(",") if g]
    if not group_by or not set(group_by) <= {"tenant", "model", "day"}:
        print("error: --by must be a subset of tenant,model,day", file=sys.stderr)
        return 1
    filters = finops.Filters(parse_date(since), parse_date(until, end=True), tenant, model)

    async def query() -> dict[str, Any]:
        async with stores.reporting_ledger(loaded) as ledger:  # SQLite, PostgreSQL or Redis+PostgreSQL
            return await spend_report(ledger, loaded, filters, group_by, datetime.now(UTC))

    report = asyncio.run(query())
    if fmt == "csv":
        sys.stdout.write(spend_csv(report, loaded, group_by))
    elif fmt == "json":
        print(orjson.dumps(report["data"], option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(report["data"], [*group_by, *finops.LEGACY_COLUMNS]))
        print("\nunit economics (per tenant and model)")
        print(render_table(report["unit_economics"], ["tenant", "model", "requests", "tokens", "cost_usd",
                                                      "cost_per_1k_requests_usd", "tokens_per_request"]))
        if report["budget_burn"]:
            print("\nbudget burn (current windows)")
            print(render_table(report["budget_burn"], ["tenant", "window", "kind", "limit", "spent", "used_pct",
                                                       "rate_per_day", "exhausts_on", "exhausts_within_window"]))
    return 0


AUDIT_COLUMNS = ["seq", "ts", "kind", "request_id", "tenant", "action", "route", "model_served", "data_class",
                 "status", "outcome", "input_tokens", "output_tokens", "cost_usd", "latency_ms"]


def audit_command(loaded: LoadedConfig, *, fmt: str, tenant: str | None, since: str | None, until: str | None,
                  kind: str | None, limit: int) -> int:
    conn = audit_store.connect(loaded.database)
    try:
        records = audit_store.read(conn, since=parse_date(since), until=parse_date(until, end=True),
                                   tenant=tenant, kind=kind, limit=limit)
    finally:
        conn.close()
    if fmt == "jsonl":
        for record in records:
            print(orjson.dumps(record).decode())
    else:
        print(render_table(records, AUDIT_COLUMNS))
    return 0


def audit_verify_command(loaded: LoadedConfig, copies: Sequence[str] = ()) -> int:
    """The database's chain (every segment), this config's JSON-lines copy and any other
    replica's copy named in `copies` (each its own segment)."""
    paths = [loaded.audit_jsonl_path, *(Path(c) for c in copies)]
    results = audit_store.verify_all(loaded.database, paths)
    for result in results:
        print(result.describe(), file=sys.stdout if result.ok else sys.stderr)
    broken = [r for r in results if not r.ok]
    if broken:
        first = broken[0]
        print(f"audit chain broken: first broken record seq {first.broken_seq} in {first.source}", file=sys.stderr)
        return 1
    print("audit chain ok")
    return 0
