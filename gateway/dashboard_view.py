"""HTML for the FinOps dashboard: server-rendered, charts as inline SVG, no scripts.

Every number carries its exact value in a `data-*` attribute (tests and scrapers read those;
people read the formatted text).
"""
from __future__ import annotations

from datetime import date
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

_CSS_PATH = Path(__file__).with_name("static") / "dashboard.css"
PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777")


def _css() -> str:
    try:
        return _CSS_PATH.read_text()
    except OSError:
        return ""


def usd(value: Decimal | str) -> str:
    d = Decimal(value)
    return f"${d:,.2f}" if abs(d) >= 1 else f"${d:.6f}"


def _doc(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_css()}</style></head>"
            f"<body>{body}</body></html>")


def login_page(error: str | None = None) -> str:
    message = f"<p class='error' id='login-error'>{escape(error)}</p>" if error else ""
    return _doc("Gateway dashboard: sign in", f"""
<main class="login"><form method="post" action="/dashboard/login" id="login-form" class="card">
<h1>Model gateway</h1><p class="muted">FinOps dashboard. Sign in with the admin key.</p>{message}
<label for="key">Admin key</label>
<input type="password" id="key" name="key" autocomplete="current-password" required autofocus>
<button type="submit" id="login-submit">Sign in</button></form></main>""")


def _stacked_bars(data: dict[str, Any]) -> str:
    days: list[str] = data["days"]
    series: dict[str, list[str]] = data["spend_by_tenant_day"]
    width, height, left, bottom, top = 760, 260, 78, 36, 12
    plot_w, plot_h = width - left - 12, height - bottom - top
    totals = [sum((Decimal(series[t][i]) for t in series), Decimal(0)) for i in range(len(days))]
    peak = max(totals, default=Decimal(0)) or Decimal(1)
    slot = plot_w / max(len(days), 1)
    parts = [(f"<svg id='spend-chart' class='chart' viewBox='0 0 {width} {height}' role='img' "
              f"aria-label='Spend per day, stacked by tenant' xmlns='http://www.w3.org/2000/svg'>")]
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(f"<line x1='{left}' x2='{width - 12}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
                     f"<text x='{left - 6}' y='{y + 4:.1f}' class='axis' text-anchor='end'>{usd(peak * i / 4)}</text>")
    for i, day in enumerate(days):
        x, base = left + slot * i + slot * 0.15, Decimal(0)
        for n, tenant in enumerate(sorted(series)):
            value = Decimal(series[tenant][i])
            if value <= 0:
                continue
            y0 = top + plot_h - float(base / peak) * plot_h
            h = max(float(value / peak) * plot_h, 1.0)
            parts.append(f"<rect class='bar' x='{x:.1f}' y='{y0 - h:.1f}' width='{slot * 0.7:.1f}' height='{h:.1f}' "
                         f"fill='{PALETTE[n % len(PALETTE)]}' data-tenant='{escape(tenant)}' data-day='{day}' "
                         f"data-usd='{value}'><title>{escape(tenant)} {day}: {usd(value)}</title></rect>")
            base += value
        if len(days) <= 16 or i % max(len(days) // 12, 1) == 0:
            parts.append(f"<text x='{x + slot * 0.35:.1f}' y='{height - 14}' class='axis' "
                         f"text-anchor='middle'>{day[5:]}</text>")
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:{PALETTE[n % len(PALETTE)]}'></i>{escape(t)}</span>"
                     for n, t in enumerate(sorted(series)))
    empty = "" if series else "<p class='muted'>No spend recorded in this range.</p>"
    return "".join(parts) + f"<div class='legend'>{legend}</div>{empty}"


def _requests_chart(summary: dict[str, Any], days: list[str]) -> str:
    per_day = {d["day"]: d for d in summary["days"]}
    width, height, left, bottom, top = 760, 160, 78, 30, 10
    plot_w, plot_h = width - left - 12, height - bottom - top
    peak = max((d["requests"] for d in summary["days"]), default=0) or 1
    slot = plot_w / max(len(days), 1)
    parts = [(f"<svg id='requests-chart' class='chart' viewBox='0 0 {width} {height}' role='img' "
              f"aria-label='Requests and errors per day' xmlns='http://www.w3.org/2000/svg'>"),
             f"<text x='{left - 6}' y='{top + 8}' class='axis' text-anchor='end'>{peak}</text>",
             f"<line x1='{left}' x2='{width - 12}' y1='{top + plot_h}' y2='{top + plot_h}' class='grid'/>"]
    for i, day in enumerate(days):
        d = per_day.get(day, {"requests": 0, "errors": 0})
        x = left + slot * i + slot * 0.15
        for cls, n in (("req", d["requests"]), ("err", d["errors"])):
            if n:
                h = n / peak * plot_h
                parts.append(f"<rect class='{cls}' x='{x:.1f}' y='{top + plot_h - h:.1f}' width='{slot * 0.7:.1f}' "
                             f"height='{h:.1f}' data-day='{day}' data-count='{n}'><title>{day}: {n} {cls}</title></rect>")
        if len(days) <= 16 or i % max(len(days) // 12, 1) == 0:
            parts.append(f"<text x='{x + slot * 0.35:.1f}' y='{height - 10}' class='axis' "
                         f"text-anchor='middle'>{day[5:]}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _table(table_id: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(rows) or f"<tr><td colspan='{len(headers)}' class='muted'>Nothing in this range.</td></tr>"
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _top_models(models: list[dict[str, Any]]) -> str:
    peak = max((Decimal(m["cost_usd"]) for m in models), default=Decimal(0)) or Decimal(1)
    rows = [f"<tr data-model='{escape(m['model'])}' data-usd='{m['cost_usd']}'><td>{escape(m['model'])}</td>"
            f"<td class='num'>{usd(m['cost_usd'])}</td><td class='num'>{m['requests']}</td>"
            f"<td class='barcell'><span class='hbar' style='width:{float(Decimal(m['cost_usd']) / peak * 100):.1f}%'>"
            f"</span></td></tr>" for m in models]
    return _table("top-models", ["Model", "Cost", "Requests", ""], rows)


def _burn(burn: list[dict[str, Any]]) -> str:
    if not burn:
        return "<p class='muted' id='budget-burn'>No tenant in this view has a capped budget.</p>"
    items = []
    for b in burn:
        pct = min(b["used_pct"], 100.0)
        level = "bad" if pct >= 90 else "warn" if pct >= 70 else "ok"
        spent = usd(b["spent"]) if b["kind"] == "usd" else f"{int(b['spent']):,} tok"
        limit = usd(b["limit"]) if b["kind"] == "usd" else f"{int(b['limit']):,} tok"
        if b["exhausts_on"] and b["exhausts_within_window"]:
            forecast = f"exhausts on <b class='exhausts'>{b['exhausts_on']}</b> at the current rate"
        elif b["exhausts_on"] and int(b["exhausts_on"][:4]) <= date.today().year + 1:
            forecast = f"lasts the window (at this rate it would run out on {b['exhausts_on']})"
        elif b["exhausts_on"]:
            forecast = "lasts the window (not exhausted within a year at this rate)"
        else:
            forecast = "no spend yet in this window"
        items.append(
            f"<div class='burn' data-tenant='{escape(b['tenant'])}' data-window='{b['window']}' data-kind='{b['kind']}' "
            f"data-spent='{b['spent']}' data-limit='{b['limit']}' data-exhausts='{b['exhausts_on'] or ''}'>"
            f"<div class='burn-label'><span><b>{escape(b['tenant'])}</b> · {b['window']} {b['kind']}</span>"
            f"<span>{spent} of {limit} ({b['used_pct']}%)</span></div>"
            f"<div class='track'><div class='fill {level}' style='width:{pct:.1f}%'></div></div>"
            f"<div class='muted small'>{forecast}</div></div>")
    return f"<div id='budget-burn'>{''.join(items)}</div>"


def _filters(data: dict[str, Any]) -> str:
    options = "".join(f"<option value='{escape(t)}'{' selected' if t == data['tenant'] else ''}>{escape(t)}</option>"
                      for t in data["tenants_configured"])
    return (f"<form method='get' action='/dashboard' class='filters' id='filters'>"
            f"<label>From <input type='date' name='since' value='{data['since']}'></label>"
            f"<label>To <input type='date' name='until' value='{data['until']}'></label>"
            f"<label>Tenant <select name='tenant'><option value=''>All tenants</option>{options}</select></label>"
            f"<button type='submit'>Apply</button></form>")


def render_page(data: dict[str, Any], csv_query: str) -> str:
    summary = data["requests"]
    total = Decimal(data["total_cost_usd"])
    per_1k = total * 1000 / data["ledger_requests"] if data["ledger_requests"] else Decimal(0)
    spend_rows = [f"<tr data-tenant='{escape(t)}' data-usd='{c}'><td>{escape(t)}</td><td class='num'>{usd(c)}</td></tr>"
                  for t, c in sorted(data["spend_by_tenant"].items())]
    unit_rows = [f"<tr><td>{escape(u['tenant'])}</td><td>{escape(u['model'])}</td><td class='num'>{u['requests']}</td>"
                 f"<td class='num'>{usd(u['cost_per_1k_requests_usd'])}</td><td class='num'>{u['tokens_per_request']}</td></tr>"
                 for u in data["unit_economics"]]
    latency_rows = [f"<tr data-model='{escape(m['model'])}' data-p95='{m['p95_ms']}'><td>{escape(m['model'])}</td>"
                    f"<td class='num'>{m['p95_ms']:,.1f} ms</td><td class='num'>{m['samples']}</td></tr>"
                    for m in summary["p95_latency_ms"]]
    scope = escape(data["tenant"]) if data["tenant"] else "all tenants"
    body = f"""
<header><div><h1>Model gateway · FinOps</h1>
<p class="muted">{data['since']} to {data['until']} (UTC) · {scope}</p></div>
<div class="actions"><a id="csv-download" class="button" href="/dashboard/spend.csv?{escape(csv_query)}" download>
Download CSV</a><form method="post" action="/dashboard/logout"><button class="link" type="submit">Sign out</button></form>
</div></header>
<main>{_filters(data)}
<section class="kpis">
<div class="card kpi"><span>Total spend</span><b id="total-cost" data-usd="{data['total_cost_usd']}">{usd(total)}</b></div>
<div class="card kpi"><span>Requests (ledger)</span><b id="total-requests">{data['ledger_requests']:,}</b></div>
<div class="card kpi"><span>Cost per 1k requests</span><b id="cost-per-1k">{usd(per_1k)}</b></div>
<div class="card kpi"><span>Error rate</span><b id="error-rate" data-rate="{summary['error_rate']}">
{summary['error_rate'] * 100:.1f}%</b><small>{summary['errors']} of {summary['requests']} requests</small></div>
</section>
<section class="card wide"><h2>Spend over time, per tenant</h2>{_stacked_bars(data)}</section>
<section class="grid2">
<div class="card"><h2>Top models by cost</h2>{_top_models(data['top_models'])}</div>
<div class="card"><h2>Budget burn</h2>{_burn(data['budget_burn'])}</div>
</section>
<section class="card wide"><h2>Requests and errors per day</h2>{_requests_chart(summary, data['days'])}
<div class="legend"><span class="key"><i class="req"></i>requests</span><span class="key"><i class="err"></i>errors (4xx/5xx)</span></div></section>
<section class="grid2">
<div class="card"><h2>p95 latency per model</h2>{_table('latency-table', ['Model', 'p95', 'Samples'], latency_rows)}</div>
<div class="card"><h2>Spend per tenant</h2>{_table('spend-by-tenant', ['Tenant', 'Cost'], spend_rows)}</div>
</section>
<section class="card wide"><h2>Unit economics</h2>
{_table('unit-economics', ['Tenant', 'Model', 'Requests', 'Cost / 1k requests', 'Tokens / request'], unit_rows)}</section>
</main>"""
    return _doc("Gateway FinOps dashboard", body)
