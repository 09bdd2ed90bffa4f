#!/usr/bin/env python3
"""CPU instructions per request of the whole request path, counted by valgrind (callgrind).

    .venv/bin/python bench/instructions.py [--without audit,ratelimit,...] [--small 320 --large 1600]

Wall-clock and CPU-time numbers on a shared, noisy box move by 10-20% between runs; instruction
counts do not (a few thousand per request). So this is the benchmark for "did this change make
the hot path cheaper?": it drives the real app (`gateway.app.create_app`, every stage on:
auth, rate limits, budget balance and reserve, policy with content scan, settle, audit hash
chain to SQLite and JSON lines, metrics) in process with 16 requests in flight, against an
upstream client that answers at once, so neither HTTP server nor upstream is counted. It runs
the same script for two request counts and prints (I_large - I_small) / (large - small): start-up
and imports cancel out; the ledger and audit writer threads are counted (they share the core).

`--without STAGE,...` measures what a stage costs by replacing it with a no-op, for this
measurement only: trace, classify (content scan), ratelimit, balance, reserve, choose
(the policy decision, memoised), count (metrics), audit (record and writer), auditwriter
(the writer only), settle, ledgerwrite (the SQLite flush of ledger rows). Each row of the table
is one pair of valgrind runs (about a minute each here).

Baseline printed alongside: the same app with the pipeline replaced by a floor-like handler
(key check, JSON parse, upstream call, answer), i.e. what the HTTP edge and test driver cost.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("trace", "classify", "ratelimit", "balance", "reserve", "choose", "count", "audit", "auditwriter",
          "settle", "ledgerwrite")


def count(requests: int, without: str) -> int:
    env = dict(os.environ, GW_INSTR_WITHOUT=without, BENCH_UPSTREAM_KEY="sk-instructions")
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--drive", str(requests)], env=env, capture_output=True, text=True, check=True).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--without", default="", help=f"comma list of stages to measure, from: {', '.join(STAGES)}")
    ap.add_argument("--small", type=int, default=320)
    ap.add_argument("--large", type=int, default=1600)
    ap.add_argument("--no-floor", action="store_true", help="skip the floor-like baseline row")
    ap.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive is not None:
        drive(args.drive, os.environ.get("GW_INSTR_WITHOUT", ""))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    unknown = [s for s in args.without.split(",") if s and s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s): {', '.join(unknown)}")

    def per_request(without: str) -> float:
        return (count(args.large, without) - count(args.small, without)) / (args.large - args.small)

    full = per_request("")
    rows = [("every stage on", full, None)]
    for stage in filter(None, args.without.split(",")):
        rest = per_request(stage)
        rows.append((f"without {stage}", rest, full - rest))
    if not args.no_floor:
        rows.append(("floor-like handler (baseline)", per_request("floorlike"), None))
    print(f"{'path':34s} {'instructions/request':>21s} {'stage costs':>12s}")
    for name, value, delta in rows:
        print(f"{name:34s} {value:21,.0f} {'' if delta is None else f'{delta:,.0f}':>12s}")
    return 0


# -- the driven process (under valgrind) -------------------------------------------------------

ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"mock-gpt","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"hello there hello there hello there"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":30,"completion_tokens":16,"total_tokens":46}}')
BODY = (b'{"model":"mock-gpt","max_tokens":16,"messages":[{"role":"system","content":"You are a helpful assistant."},'
        b'{"role":"user","content":"Write one short sentence about benchmarking HTTP gateways on loopback."}]}')


def drive(requests: int, without: str) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import uvloop

    uvloop.run(_drive(requests, set(filter(None, without.split(",")))))


async def _drive(requests: int, off: set[str]) -> None:
    from run import write_config

    from adapters.base import UpstreamResponse
    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.runtime import Runtime
    from gateway.settings import Settings

    class InstantUpstream:
        async def send(self, request: Any, **_: Any) -> UpstreamResponse:
            await asyncio.sleep(0)
            return UpstreamResponse(status=200, headers={"content-type": "application/json"}, body=ANSWER)

        async def close(self) -> None:
            return None

    from gateway.serve import tune_gc

    _switch_off(off)
    tune_gc()  # the collector settings `gateway serve` runs with
    with tempfile.TemporaryDirectory(prefix="gw-instructions-") as tmp:
        rt = Runtime(load_config(write_config(Path(tmp), "http://127.0.0.1:9/v1")), Settings())
        app = create_app(rt)
        await rt.start()
        await rt.client.close()
        rt.client = InstantUpstream()  # type: ignore[assignment]
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                 "http_version": "1.1", "headers": [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer gw-bench-key"),
                                                    (b"content-type", b"application/json"),
                                                    (b"content-length", str(len(BODY)).encode())]}

        async def one() -> None:
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": BODY, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(dict(scope), receive, send)
            if sent[0]["status"] != 200:
                raise SystemExit(f"request failed: {sent}")

        for _ in range(max(1, requests // 16)):
            await asyncio.gather(*(one() for _ in range(16)))
        await rt.ledger.flush()
        await rt.audit.flush()
        await rt.close()


def _switch_off(off: set[str]) -> None:
    """Measurement-only no-ops for the stages named in `off` (see --without)."""
    from gateway import pipeline, relay, telemetry

    if "trace" in off:
        telemetry.Telemetry.begin = lambda self, ex, headers: setattr(ex, "trace_id", "0" * 32)  # type: ignore[method-assign]
    if "classify" in off:
        from gateway.datarisk import DataClassVerdict
        verdict = DataClassVerdict("internal", "internal", (), (), scanned=True)
        pipeline.classify = lambda *a: verdict  # type: ignore[assignment]
    if "ratelimit" in off:
        pipeline.rate_limit = _noop  # type: ignore[assignment]
    if "balance" in off:
        pipeline.read_balance = _no_balance  # type: ignore[assignment]
    if "reserve" in off:
        pipeline.reserve = _noop  # type: ignore[assignment]
    if "choose" in off:
        real, memo = pipeline.choose, {}

        def choose(facts: Any, catalog: Any, policy: Any, rng: Any) -> Any:
            if facts.requested_model not in memo:
                memo[facts.requested_model] = real(facts, catalog, policy, rng)
            return memo[facts.requested_model]

        pipeline.choose = choose  # type: ignore[assignment]
    if "count" in off:
        relay._count = lambda *a: None  # type: ignore[assignment]
    if "audit" in off or "auditwriter" in off:
        from gateway.audit import AuditWriter
        AuditWriter.write = lambda self, record: None  # type: ignore[method-assign]
    if "audit" in off:
        relay._audit_record = lambda *a: None  # type: ignore[assignment]
    if "settle" in off:
        relay._settle = _noop  # type: ignore[assignment]
    if "ledgerwrite" in off:
        from budgets.sqlite_ledger import SqliteLedger

        async def dropped(self: Any) -> None:
            self._queue.clear()

        SqliteLedger._flush_locked = dropped  # type: ignore[method-assign]
    if "floorlike" in off:
        import orjson
        from starlette.responses import Response

        async def handle(rt: Any, request: Any, parse: Any, endpoint: str, api: str = "openai") -> Response:
            if request.headers.get("authorization") != "Bearer gw-bench-key":
                return Response(b"no", 401)
            orjson.loads(await request.body())
            answer = await rt.client.send(None)
            return Response(answer.body, answer.status, media_type=answer.headers.get("content-type"))

        pipeline.handle = handle  # type: ignore[assignment]


async def _noop(*args: Any, **kwargs: Any) -> None:
    return None


async def _no_balance(*args: Any) -> tuple[None, None]:
    return None, None


if __name__ == "__main__":
    raise SystemExit(main())
