"""Result table for bench/run.py (markdown, columns padded so it also reads well in a terminal)."""
from __future__ import annotations

import math
from typing import Any

COLUMNS = ["mode", "conc", "direct rps", "gw rps", "gw/direct", "direct p50 / p99 ms", "gw p50 / p99 ms",
           "added p50 / p99 ms", "gw CPU-ms/req", "gw hdr overhead p50 ms", "errors d / gw", "fwd %",
           "bg CPU % d / gw"]


def _num(v: Any, fmt: str) -> str:
    if v is None or isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, fmt)


def row_cells(row: dict[str, Any]) -> list[str]:
    d, g = row["direct"], row.get("gateway")
    if g is None:
        return [row["mode"], str(row["conc"]), _num(d["rps"], ".0f")] + ["-"] * (len(COLUMNS) - 3)
    ratio = g["rps"] / d["rps"] if d["rps"] else None
    return [row["mode"], str(row["conc"]), _num(d["rps"], ".0f"), _num(g["rps"], ".0f"), _num(ratio, ".2f"),
            f"{_num(d['p50_ms'], '.2f')} / {_num(d['p99_ms'], '.2f')}",
            f"{_num(g['p50_ms'], '.2f')} / {_num(g['p99_ms'], '.2f')}",
            f"{_num(g['p50_ms'] - d['p50_ms'], '+.2f')} / {_num(g['p99_ms'] - d['p99_ms'], '+.2f')}",
            _num(g.get("cpu_ms_per_req"), ".3f"), _num(g.get("overhead_p50_ms"), ".3f"),
            f"{d['errors']} / {g['errors']}", _num(g.get("fwd_pct"), ".1f"),
            f"{_num(d.get('bg_cpu_pct'), '.0f')} / {_num(g.get('bg_cpu_pct'), '.0f')}"]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        padded = [v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i >= 2 else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(c) for c in cells[1:]])


def render(result: dict[str, Any]) -> str:
    info = result["info"]
    head = (f"{info['started']}  {info['cpu_model']} x{info['ncpu']}  load generator: {info['load_generator']}  "
            f"{info['duration_s']} s per run after {info['warmup_s']} s warm-up; upstream delay {info['delay_ms']} ms; "
            f"pinning: upstream+client CPU {info['client_cpus'] or '-'}, gateway CPU {info['gateway_cpus'] or '-'}; "
            f"loadavg {info['loadavg_start']} -> {info.get('loadavg_end', '?')}")
    extra = [f"gateway: {info['gateway_cmd']}",
             (f"gateway idle RSS {info.get('gateway_idle_rss_mb')} MB; ready after {info.get('gateway_ready_s')} s; "
              f"stream smoke: {info.get('stream_smoke')}")]
    notes = ["", ("added = gateway - direct at the same concurrency (same minute). CPU-ms/req = gateway process-tree "
                  "utime+stime / requests the upstream received (most noise-robust). hdr overhead = median of the "
                  "gateway's own x-gateway-overhead-ms. fwd % = upstream requests / gateway responses. "
                  "bg CPU % = machine busy time used by other processes (% of all CPUs): tens of % = noisy row.")]
    return "\n".join([head, *extra, "", table(result["rows"]), *notes])
