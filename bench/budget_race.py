#!/usr/bin/env python3
"""The multi-replica budget race, repeatable: N concurrent requests spread over R gateway
processes sharing PostgreSQL and Redis, against a budget that fits exactly K worst-case
requests. Prints admitted count, upstream calls, and settled spend vs the budget.

    .venv/bin/python bench/budget_race.py [--replicas 3] [--requests 50] [--fits 3] [--rounds 3]

Every round uses a fresh schema and key prefix. A round passes only if exactly K requests are
admitted, the upstream sees exactly K calls, every other request gets 429 `budget_exceeded`
(any other answer fails the round), every admitted request has its ledger row, and the
settled spend is within the budget; exit 1 if any round fails.
Uses GATEWAY_TEST_POSTGRES_URL / GATEWAY_TEST_REDIS_URL like the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budgets import Price, cost
from gateway.parsing import parse_chat
from tests.gatewayprocs import cluster
from tests.harness import TENANT_KEY, UpstreamProcess

BODY = {"model": "mock-a", "messages": [{"role": "user", "content": "race for the budget"}]}
WORST = cost(Price(Decimal(1), Decimal(2)), parse_chat(orjson.dumps(BODY)).input_tokens_bound, 256)


async def burst(urls: list[str], n: int) -> list[str]:
    """Each answer as ``200``, ``429:<error code>`` or its status (a transport error: ``error``)."""
    async def one(http: httpx.AsyncClient, i: int) -> str:
        try:
            answer = await http.post(f"{urls[i % len(urls)]}/chat/completions", json=BODY,
                                     headers={"authorization": f"Bearer {TENANT_KEY}"})
        except httpx.HTTPError as exc:
            return f"error:{type(exc).__name__}"
        if answer.status_code == 429:
            return f"429:{answer.json().get('error', {}).get('code')}"
        return str(answer.status_code)

    async with httpx.AsyncClient(timeout=60) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(n))))


def problems(outcomes: Sequence[str], fits: int, calls: int, rows: int, settled: Decimal,
             budget: Decimal) -> list[str]:
    """Why a round fails (empty: it passed). Exact, not just "no overshoot": fewer admitted
    than fit means the budget refused what it had room for."""
    seen = Counter(outcomes)
    admitted = seen.pop("200", 0)
    seen.pop("429:budget_exceeded", 0)
    found = []
    if admitted != fits:
        found.append(f"admitted {admitted}, expected exactly {fits}")
    if calls != fits:
        found.append(f"upstream saw {calls} calls, expected exactly {fits}")
    if seen:
        found.append("answers other than 200 / 429 budget_exceeded: "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
    if rows != admitted:
        found.append(f"{rows} ledger rows for {admitted} admitted requests")
    if settled > budget:
        found.append(f"settled {settled} USD over the budget of {budget} USD")
    return found


def one_round(upstream: UpstreamProcess, replicas: int, requests: int, fits: int, delay_ms: int) -> bool:
    budget = fits * WORST

    def edit(config: dict) -> None:  # type: ignore[type-arg]
        config["tenants"][0].update(budgets=[{"window": "day", "max_usd": str(budget)}], rate_limits={})

    upstream.reset()
    with tempfile.TemporaryDirectory() as tmp, cluster(upstream.url, Path(tmp), replicas, edit=edit) as c:
        upstream.script(*({"delay_ms": delay_ms} for _ in range(requests)))
        started = time.perf_counter()
        outcomes = asyncio.run(burst([n.v1 for n in c.nodes], requests))
        elapsed = time.perf_counter() - started
        calls = len([a for a in upstream.attempts() if a["path"] == "/v1/chat/completions"])
        deadline = time.monotonic() + 10
        rows: list[tuple[object, ...]] = []
        while time.monotonic() < deadline and len(rows) < outcomes.count("200"):
            time.sleep(0.05)
            rows = c.query("SELECT cost_usd FROM ledger_entries")
        time.sleep(0.2)  # late rows too, so an extra one is seen
        rows = c.query("SELECT cost_usd FROM ledger_entries")
        settled = sum((Decimal(r[0]) for r in rows), Decimal(0))  # type: ignore[arg-type]
    admitted, refused = outcomes.count("200"), outcomes.count("429:budget_exceeded")
    found = problems(outcomes, fits, calls, len(rows), settled, budget)
    print(f"replicas={replicas} requests={requests} admitted={admitted} refused_429={refused} "
          f"other={requests - admitted - refused} upstream_calls={calls} ledger_rows={len(rows)} "
          f"settled_usd={settled} budget_usd={budget} worst_case_usd={WORST} "
          f"settled/budget={settled / budget:.3f} wall_s={elapsed:.2f} "
          f"{'OK' if not found else 'FAIL: ' + '; '.join(found)}", flush=True)
    return not found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--fits", type=int, default=3, help="worst-case requests the budget fits exactly")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=int, default=500, help="upstream latency: keeps requests overlapping")
    args = parser.parse_args()
    if not 0 <= args.fits <= args.requests:
        parser.error("--fits must be between 0 and --requests")
    upstream = UpstreamProcess()
    try:
        results = [one_round(upstream, args.replicas, args.requests, args.fits, args.delay_ms)
                   for _ in range(args.rounds)]
    finally:
        upstream.close()
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
