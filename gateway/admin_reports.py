"""`GET /admin/spend` and `GET /admin/audit` (admin key only)."""
from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import audit_store, finops, reports
from gateway.errors import InvalidApiKey, InvalidRequest

if TYPE_CHECKING:
    from gateway.runtime import Runtime


def is_admin_key(rt: Runtime, presented: str | None) -> bool:
    return bool(rt.admin_key and presented and hmac.compare_digest(presented.encode(), rt.admin_key.encode()))


def require_admin(rt: Runtime, request: Request) -> None:
    from gateway.pipeline import presented_key

    if not is_admin_key(rt, presented_key(request)):
        raise InvalidApiKey("admin routes need the admin key")


def query_date(request: Request, name: str, *, end: bool = False) -> datetime | None:
    try:
        return reports.parse_date(request.query_params.get(name) or None, end=end)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO date (YYYY-MM-DD) or datetime", param=name) from None


def spend_filters(request: Request) -> finops.Filters:
    q = request.query_params
    return finops.Filters(query_date(request, "since"), query_date(request, "until", end=True),
                          q.get("tenant") or None, q.get("model") or None)


async def admin_spend(rt: Runtime, request: Request) -> Response:
    """Spend grouped by `by`, unit economics and budget burn; `format=csv` gives the CLI's CSV."""
    require_admin(rt, request)
    q = request.query_params
    group_by = [g for g in (q.get("by") or "tenant,model,day").split(",") if g]
    if not group_by or not set(group_by) <= {"tenant", "model", "day"}:
        raise InvalidRequest("'by' must be a subset of tenant,model,day", param="by")
    report = await reports.spend_report(rt.ledger, rt.loaded, spend_filters(request), group_by, datetime.now(UTC))
    if q.get("format") == "csv":
        return Response(reports.spend_csv(report, rt.loaded, group_by), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="spend.csv"'})
    total = sum((r.cost_usd for r in report["rows"]), Decimal(0))
    body = {"data": report["data"], "unit_economics": report["unit_economics"],
            "budget_burn": report["budget_burn"],
            "totals": {"requests": sum(r.requests for r in report["rows"]), "cost_usd": str(total)}}
    return Response(orjson.dumps(body), media_type="application/json")


async def admin_audit(rt: Runtime, request: Request) -> Response:
    """Audit records (metadata; bodies only redacted), filtered by since, until, tenant, kind."""
    require_admin(rt, request)
    q = request.query_params
    kind = q.get("kind") or None
    if kind is not None and kind not in ("request", "admin", "purge"):
        raise InvalidRequest("'kind' must be request, admin or purge", param="kind")
    limit_text = q.get("limit") or "1000"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 10000:
        raise InvalidRequest("'limit' must be an integer from 1 to 10000", param="limit")
    await rt.audit.flush()
    since, until = query_date(request, "since"), query_date(request, "until", end=True)

    def read() -> list[dict[str, object]]:
        conn = audit_store.connect(rt.db_path)
        try:
            return audit_store.read(conn, since=since, until=until, tenant=q.get("tenant") or None, kind=kind,
                                    limit=int(limit_text))
        finally:
            conn.close()

    records = await asyncio.to_thread(read)
    if q.get("format") == "jsonl":
        lines = b"".join(orjson.dumps(r) + b"\n" for r in records)
        return Response(lines, media_type="application/x-ndjson")
    return Response(orjson.dumps({"data": records}), media_type="application/json")
