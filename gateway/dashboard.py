"""`GET /dashboard`: the FinOps page, served by the gateway itself (HTML + inline SVG, no JS).

Access needs the admin key: either `Authorization: Bearer` (scripts) or the login form,
which sets a signed session cookie (HttpOnly, SameSite=Strict) holding an expiry and a
signature, never the key; the key never appears in a URL. The signing key is derived from
the admin key, so rotating the admin key ends every session, and workers share sessions.

Numbers come from the same functions as `gateway spend` (gateway/finops.py, gateway/reports.py),
and the page's CSV link serves exactly `gateway spend --format csv` for the filters shown.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway import audit_store, finops, reports
from gateway.admin_reports import is_admin_key
from gateway.dashboard_view import login_page, render_page
from gateway.errors import InvalidRequest

if TYPE_CHECKING:
    from gateway.runtime import Runtime

COOKIE = "gw_dashboard"
SESSION_TTL_S = 12 * 3600
DEFAULT_DAYS = 14
_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _signing_key(admin_key: str) -> bytes:
    return hmac.new(admin_key.encode(), b"gateway-dashboard-session-v1", hashlib.sha256).digest()


def new_session(admin_key: str, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_TTL_S)
    payload = f"{expires}.{secrets.token_urlsafe(12)}"
    sig = hmac.new(_signing_key(admin_key), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{sig}"


def valid_session(admin_key: str | None, value: str | None, now: float | None = None) -> bool:
    if not admin_key or not value or value.count(".") != 2:
        return False
    expires, nonce, sig = value.split(".")
    expected = hmac.new(_signing_key(admin_key), f"{expires}.{nonce}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig, expected) or not expires.isdigit():
        return False
    return int(expires) > (now or time.time())


def _authorised(rt: Runtime, request: Request) -> bool:
    from gateway.pipeline import presented_key

    if valid_session(rt.admin_key, request.cookies.get(COOKIE)):
        return True
    return request.headers.get("authorization") is not None and is_admin_key(rt, presented_key(request))


def _range(request: Request) -> tuple[date, date, str | None]:
    """The dates shown (inclusive, UTC) and the tenant filter; default: the last 14 days."""
    q = request.query_params
    today = datetime.now(UTC).date()
    try:
        until = date.fromisoformat(q["until"]) if q.get("until") else today
        since = date.fromisoformat(q["since"]) if q.get("since") else until - timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        raise InvalidRequest("'since' and 'until' must be dates (YYYY-MM-DD)") from None
    if since > until or (until - since).days > 366:
        raise InvalidRequest("the date range must run forward and span at most a year")
    return since, until, q.get("tenant") or None


def _filters(since: date, until: date, tenant: str | None) -> finops.Filters:
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    end = datetime(until.year, until.month, until.day, tzinfo=UTC) + timedelta(days=1)
    return finops.Filters(start, end, tenant, None)


async def page_data(rt: Runtime, since: date, until: date, tenant: str | None) -> dict[str, Any]:
    """Everything the page shows, also served as JSON at /dashboard/data.json."""
    filters = _filters(since, until, tenant)
    report = await reports.spend_report(rt.ledger, rt.loaded, filters, ["tenant", "day"], datetime.now(UTC))
    await rt.audit.flush()

    def stats() -> list[tuple[str, str | None, str | None, int, float, str]]:
        conn = audit_store.connect(rt.db_path)
        try:
            return audit_store.request_stats(conn, filters.since, filters.until, tenant)
        finally:
            conn.close()

    summary = finops.request_summary(await asyncio.to_thread(stats))
    rows = report["rows"]
    total = sum((r.cost_usd for r in rows), Decimal(0))
    days = [(since + timedelta(days=i)).isoformat() for i in range((until - since).days + 1)]
    by_tenant_day = {(g["tenant"], g["day"]): g["cost_usd"] for g in report["data"]}
    tenants = sorted({g["tenant"] for g in report["data"]})
    return {
        "since": since.isoformat(), "until": until.isoformat(), "tenant": tenant,
        "tenants_configured": sorted(rt.tenants), "days": days, "tenants": tenants,
        "spend_by_tenant_day": {t: [by_tenant_day.get((t, d), "0") for d in days] for t in tenants},
        "spend_by_tenant": {g["tenant"]: g["cost_usd"] for g in finops.grouped(rows, ["tenant"])},
        "top_models": sorted(finops.grouped(rows, ["model"]), key=lambda g: -Decimal(g["cost_usd"]))[:10],
        "total_cost_usd": str(total), "ledger_requests": sum(r.requests for r in rows),
        "unit_economics": report["unit_economics"], "budget_burn": report["budget_burn"],
        "requests": summary,
    }


def dashboard_routes(rt: Runtime) -> list[Route]:
    async def dashboard(request: Request) -> Response:
        if not _authorised(rt, request):
            return HTMLResponse(login_page(), status_code=401, headers=_HEADERS)
        since, until, tenant = _range(request)
        data = await page_data(rt, since, until, tenant)
        csv_query = urlencode({k: v for k, v in (("since", data["since"]), ("until", data["until"]),
                                                  ("tenant", tenant)) if v})
        return HTMLResponse(render_page(data, csv_query), headers=_HEADERS)

    async def data_json(request: Request) -> Response:
        if not _authorised(rt, request):
            return Response(b'{"error":"admin session or admin key required"}', status_code=401,
                            media_type="application/json")
        import orjson

        return Response(orjson.dumps(await page_data(rt, *_range(request))), media_type="application/json")

    async def spend_csv(request: Request) -> Response:
        if not _authorised(rt, request):
            return Response("admin session or admin key required\n", status_code=401, media_type="text/plain")
        since, until, tenant = _range(request)
        report = await reports.spend_report(rt.ledger, rt.loaded, _filters(since, until, tenant),
                                            ["tenant", "model", "day"], datetime.now(UTC))
        name = f"gateway-spend-{since.isoformat()}-{until.isoformat()}.csv"
        return Response(reports.spend_csv(report, rt.loaded, ["tenant", "model", "day"]),
                        media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}"', **_HEADERS})

    async def login(request: Request) -> Response:
        body = await request.body()
        key = parse_qs(body[:4096].decode("utf-8", "replace")).get("key", [""])[0]
        if not is_admin_key(rt, key.strip()):
            return HTMLResponse(login_page("That is not the admin key."), status_code=401, headers=_HEADERS)
        assert rt.admin_key is not None
        response = RedirectResponse("/dashboard", status_code=303, headers=_HEADERS)
        response.set_cookie(COOKIE, new_session(rt.admin_key), max_age=SESSION_TTL_S, path="/dashboard",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/dashboard", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    return [
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/dashboard/data.json", data_json, methods=["GET"]),
        Route("/dashboard/spend.csv", spend_csv, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", logout, methods=["POST"]),
    ]
