#!/usr/bin/env python3
"""The multi-replica budget race, repeatable: N concurrent requests spread over R gateway
processes sharing PostgreSQL and Redis, against a budget that fits exactly K worst-case
requests. Prints admitted count, upstream calls, and settled spend vs the budget.

    .venv/bin/python bench/budget_race.py [--replicas 3] [--requests 50] [--fits 3] [--rounds 3]

Every round uses a fresh schema and key prefix. Exit 1 if any round admits more than K,
lets the upstream see more than K calls, or settles more than the budget.
Uses GATEWAY_TEST_POSTGRES_URL / GATEWAY_TEST_REDIS_URL like the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
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


async def burst(urls: list[str], n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as http:
        answers = await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/chat/completions", json=BODY,
                      headers={"authorization": f"Bearer {TENANT_KEY}"}) for i in range(n)))
    return [a.status_code for a in answers]


def one_round(upstream: UpstreamProcess, replicas: int, requests: int, fits: int, delay_ms: int) -> bool:
    budget = fits * WORST

    def edit(config: dict) -> None:  # type: ignore[type-arg]
        config["tenants"][0].update(budgets=[{"window": "day", "max_usd": str(budget)}], rate_limits={})

    upstream.reset()
    with tempfile.TemporaryDirectory() as tmp, cluster(upstream.url, Path(tmp), replicas, edit=edit) as c:
        upstream.script(*({"delay_ms": delay_ms} for _ in range(requests)))
        started = time.perf_counter()
        codes = asyncio.run(burst([n.v1 for n in c.nodes], requests))
        elapsed = time.perf_counter() - started
        calls = len([a for a in upstream.attempts() if a["path"] == "/v1/chat/completions"])
        deadline = time.monotonic() + 10
        rows: list[tuple[object, ...]] = []
        while time.monotonic() < deadline and len(rows) < codes.count(200):
            rows = c.query("SELECT cost_usd FROM ledger_entries")
            time.sleep(0.05)
        settled = sum((Decimal(r[0]) for r in rows), Decimal(0))  # type: ignore[arg-type]
    admitted, refused = codes.count(200), codes.count(429)
    ok = admitted <= fits and calls <= fits and settled <= budget
    print(f"replicas={replicas} requests={requests} admitted={admitted} refused_429={refused} "
          f"other={requests - admitted - refused} upstream_calls={calls} settled_usd={settled} "
          f"budget_usd={budget} worst_case_usd={WORST} settled/budget={settled / budget:.3f} "
          f"wall_s={elapsed:.2f} {'OK' if ok else 'OVERSHOOT'}", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--fits", type=int, default=3, help="worst-case requests the budget fits exactly")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=int, default=500, help="upstream latency: keeps requests overlapping")
    args = parser.parse_args()
    upstream = UpstreamProcess()
    try:
        results = [one_round(upstream, args.replicas, args.requests, args.fits, args.delay_ms)
                   for _ in range(args.rounds)]
    finally:
        upstream.close()
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
