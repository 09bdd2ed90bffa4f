#!/usr/bin/env python3
"""Admission overhead per ledger backend: one reserve + settle round trip per request.

    .venv/bin/python bench/budget_overhead.py [--requests 2000] [--concurrency 1,32] [--json OUT]

For each backend (sqlite: in-process counters + SQLite file; postgres: PostgresLedger, row
locks; redis: RedisLedger, Lua over Redis + rows in PostgreSQL) it runs closed-loop
"requests" of reserve -> settle against a roomy budget with two windows (day USD, month
tokens), then flushes, and prints: reserve latency p50/p99 (what admission adds to a
request), settle p50 (queued: what the request path pays), throughput, and CPU time of this
process per request including the batched background writes. Uses the services of the test
suite (GATEWAY_TEST_POSTGRES_URL, GATEWAY_TEST_REDIS_URL), in a throwaway schema and prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budgets import BudgetLimit, Ledger, LedgerEntry, RequestRef
from tests.budgets.backends import make, stores

LIMITS = [BudgetLimit("day", max_usd=Decimal(1000000)), BudgetLimit("month", max_tokens=10**12)]


def _entry(i: int, now: datetime) -> LedgerEntry:
    return LedgerEntry(request_id=f"bench-{i}", attempt=1, ts=now, tenant="bench", key_id=None, model="m",
                       provider="p", input_tokens=120, output_tokens=80, cached_input_tokens=0,
                       cost_usd=Decimal("0.000123"), usage_estimated=False, status="ok")


async def _run(ledger: Ledger, requests: int, concurrency: int) -> dict[str, float]:
    reserve_us: list[float] = []
    settle_us: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            now = datetime.now(UTC)
            t0 = time.perf_counter()
            res = await ledger.reserve("bench", LIMITS, 500, Decimal("0.0005"), now, ref=RequestRef(f"bench-{i}"))
            t1 = time.perf_counter()
            await ledger.settle(res, [_entry(i, now)])
            t2 = time.perf_counter()
            reserve_us.append((t1 - t0) * 1e6)
            settle_us.append((t2 - t1) * 1e6)

    await ledger.balance("bench", LIMITS, datetime.now(UTC))  # windows loaded: measure the steady state
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await ledger.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    reserve_us.sort()
    return {
        "reserve_p50_us": statistics.median(reserve_us),
        "reserve_p99_us": reserve_us[int(len(reserve_us) * 0.99) - 1],
        "settle_p50_us": statistics.median(settle_us),
        "requests_per_s": requests / wall,
        "cpu_us_per_request": cpu / requests * 1e6,
    }


async def bench(backend: str, requests: int, concurrency: int) -> dict[str, float]:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        shared = None if backend == "sqlite" else stores(stack)
        ledger = make(backend, Path(tmp), shared, flush_interval_s=0.01)
        await ledger.start()
        try:
            await _run(ledger, min(200, requests), concurrency)  # warm-up
            return await _run(ledger, requests, concurrency)
        finally:
            await ledger.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--backends", default="sqlite,postgres,redis")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    header = (f"{'backend':9} {'conc':>4} {'reserve p50 us':>14} {'reserve p99 us':>14} {'settle p50 us':>13} "
              f"{'req/s':>8} {'CPU us/req':>10}")
    print(header)
    print("-" * len(header))
    for backend in args.backends.split(","):
        for conc in (int(c) for c in args.concurrency.split(",")):
            r = asyncio.run(bench(backend, args.requests, conc))
            results.append({"backend": backend, "concurrency": conc, **r})
            print(f"{backend:9} {conc:>4} {r['reserve_p50_us']:>14.0f} {r['reserve_p99_us']:>14.0f} "
                  f"{r['settle_p50_us']:>13.1f} {r['requests_per_s']:>8.0f} {r['cpu_us_per_request']:>10.0f}",
                  flush=True)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
