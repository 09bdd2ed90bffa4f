#!/usr/bin/env python3
"""Soak test: minutes of steady load with client aborts and cut upstream streams; does anything leak?

Starts tests/fakeupstream.py and a real `python -m gateway serve` (temporary config and SQLite
state, as bench/run.py), then keeps `--concurrency` closed-loop clients busy for `--duration`
seconds with a mix of requests (each request carries its fault for the fake as `x_fake`):

  ~10 % client aborts (half mid-stream, half before the first byte), ~5 % streams the upstream
  cuts mid-way, the rest normal streams and JSON answers.

It takes an idle snapshot of the gateway after a warm-up and again after the load (settled):
RSS, open file descriptors, asyncio tasks (`gateway_event_loop_tasks`), upstream connections,
requests in flight and capacity slots in use; then SIGTERMs the gateway and checks that every
request was audited and settled. Exit 1 when something leaked or a request was answered wrongly.

  .venv/bin/python bench/soak.py                      # 3 minutes (CI does not run it)
  .venv/bin/python bench/soak.py --duration 30 --concurrency 16 --json /tmp/soak.json
  .venv/bin/python bench/soak.py --redis --postgres   # shared state: the test services (tests/services.py)

`--redis` / `--postgres` put reservations and rate limits in Redis / the ledger and audit rows in
PostgreSQL (GATEWAY_TEST_REDIS_URL / GATEWAY_TEST_POSTGRES_URL, a fresh key prefix and schema,
removed afterwards), as a replica would run them.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
from bench_procs import Proc, free_port, rss_mb
from run import FAKE, GATEWAY_KEY, MODEL, REPO, UPSTREAM_KEY, write_config

sys.path.insert(0, str(REPO))

TEXT = " ".join(f"word{i}" for i in range(40))
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"}
GAUGES = ("gateway_event_loop_tasks", "gateway_open_fds", "gateway_upstream_connections",
          "gateway_in_flight_requests", "gateway_active_requests", "gateway_queued_requests")


def body(kind: str, rng: random.Random) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 64,
                            "messages": [{"role": "user", "content": f"soak {rng.random()}"}]}
    if kind == "json":
        return base
    fake: dict[str, Any] = {"text": TEXT, "chunk_interval_ms": 4}
    if kind == "cut":
        fake["cut_after_chunks"] = 12
    elif kind == "abort_early":
        fake["delay_ms"] = 400
    return {**base, "stream": True, "stream_options": {"include_usage": True}, "x_fake": fake}


def pick(rng: random.Random, abort_rate: float, cut_rate: float) -> str:
    x = rng.random()
    if x < abort_rate:
        return "abort_mid" if x < abort_rate / 2 else "abort_early"
    if x < abort_rate + cut_rate:
        return "cut"
    return "json" if rng.random() < 0.3 else "stream"


async def one(http: aiohttp.ClientSession, url: str, kind: str, rng: random.Random) -> str:
    """Send one request; its verdict: ok, cut_ok (in-band error seen), aborted, or wrong:<why>."""
    payload = json.dumps(body(kind, rng)).encode()
    if kind == "abort_early":
        try:
            async with asyncio.timeout(0.05):
                async with http.post(url, data=payload, headers=AUTH) as resp:
                    await resp.read()
            return "wrong:not aborted"
        except TimeoutError:
            return "aborted"
    async with http.post(url, data=payload, headers=AUTH) as resp:
        if resp.status != 200:
            return f"wrong:HTTP {resp.status}"
        if kind == "json":
            data = await resp.json()
            return "ok" if data.get("choices") else "wrong:no choices"
        if kind == "abort_mid":
            await resp.content.readuntil(b"word3")
            resp.close()  # hang up mid-stream
            return "aborted"
        raw = await resp.read()
    tail = raw.rstrip().rsplit(b"\n", 1)[-1]
    if kind == "cut":
        return "cut_ok" if tail.startswith(b'data: {"error":') and b"[DONE]" not in raw else "wrong:cut not in-band"
    return "ok" if tail == b"data: [DONE]" else "wrong:no [DONE]"


async def load(url: str, seconds: float, concurrency: int, args: argparse.Namespace,
               tally: collections.Counter[str], seed: int) -> None:
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                kind = pick(rng, args.abort_rate, args.cut_rate)
                try:
                    verdict = await one(http, url, kind, rng)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    verdict = f"wrong:{type(exc).__name__}"
                tally[f"{kind}:{verdict}"] += 1
                tally["sent"] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def snapshot(http: aiohttp.ClientSession, base: str, pid: int) -> dict[str, float]:
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in GAUGES:
            values[name.removeprefix("gateway_")] = float(value)
    values["rss_mb"] = rss_mb([pid])
    values["fds_proc"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


async def settle(http: aiohttp.ClientSession, base: str, pid: int, seconds: float) -> dict[str, float]:
    """Wait until nothing is in flight (at most `seconds`), then one snapshot."""
    deadline = time.monotonic() + seconds
    while True:
        snap = await snapshot(http, base, pid)
        if snap.get("in_flight_requests", 1) == 0 or time.monotonic() > deadline:
            await asyncio.sleep(1.0)  # let pooled connections and finished tasks go
            return await snapshot(http, base, pid)
        await asyncio.sleep(0.2)


def shared_state(stack: ExitStack, args: argparse.Namespace, tmp: Path) -> dict[str, str]:
    """The `state:` section for --redis / --postgres: the test services, a fresh key prefix / schema."""
    from tests.services import REDIS_URL, pg_schema, redis_prefix

    state = {"database_url": f"sqlite:///{tmp / 'state.db'}", "redis_url": "null", "spool_dir": str(tmp / "spool")}
    if args.postgres:
        state["database_url"] = stack.enter_context(pg_schema())
    if args.redis:
        state["redis_url"], state["redis_key_prefix"] = REDIS_URL, stack.enter_context(redis_prefix())
    return state


def use_state(cfg: Path, state: dict[str, str], tmp: Path) -> None:
    """Rewrite the config's `state:` section (bench/run.py writes the SQLite one)."""
    text = cfg.read_text()
    head, _, rest = text.partition("state:\n")
    _, _, rest = rest.partition("audit:\n")
    lines = "".join(f"  {k}: {json.dumps(v) if v != 'null' else v}\n" for k, v in state.items())
    cfg.write_text(f"{head}state:\n{lines}audit:\n  jsonl_path: {json.dumps(str(tmp / 'audit.jsonl'))}\n{rest}")


def ledger_by_status(tmp: Path, database_url: str | None) -> dict[str, int]:
    sql = "SELECT status, count(*) FROM ledger_entries GROUP BY status"
    if database_url and database_url.startswith("postgres"):
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as pg:
            return {str(k): int(v) for k, v in pg.execute(sql).fetchall()}
    conn = sqlite3.connect(tmp / "state.db")
    try:
        return dict(conn.execute(sql).fetchall())
    finally:
        conn.close()


def stored(tmp: Path, database_url: str | None = None) -> dict[str, Any]:
    ledger = ledger_by_status(tmp, database_url)
    audit = collections.Counter()
    for line in (tmp / "audit.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind", "request") == "request":
            audit[record["outcome"]] += 1
    return {"ledger_rows_by_status": ledger, "audit_records_by_outcome": dict(audit)}


async def run(args: argparse.Namespace, tmp: Path, state: dict[str, str] | None = None) -> dict[str, Any]:
    up = await Proc("fakeupstream", [sys.executable, str(FAKE), "--port", "0", "--record-limit", "0"],
                    log=tmp / "upstream.log", pipe_stdout=True).start()
    gw: Proc | None = None
    try:
        up_url = f"http://127.0.0.1:{await up.read_ready(30)}"
        cfg = write_config(tmp, up_url + "/v1")
        if state is not None:
            use_state(cfg, state, tmp)
        port = free_port()
        env = dict(os.environ, BENCH_UPSTREAM_KEY=UPSTREAM_KEY, GATEWAY_ADMIN_KEY="soak-admin",
                   GATEWAY_LOG_LEVEL="WARNING", GATEWAY_DRAIN_TIMEOUT_S="10")
        gw = await Proc("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--host",
                                    "127.0.0.1", "--port", str(port)], env=env, cwd=str(REPO),
                        log=tmp / "gateway.log").start()
        base = f"http://127.0.0.1:{port}"
        url = base + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            tally: collections.Counter[str] = collections.Counter()
            print(f"warm-up {args.warmup:g} s ...", flush=True)
            await load(url, args.warmup, args.concurrency, args, tally, seed=1)
            before = await settle(http, base, gw.pid, 15)
            print(f"before: {before}", flush=True)
            samples = []
            t0 = time.monotonic()
            main = asyncio.create_task(load(url, args.duration, args.concurrency, args, tally, seed=2))
            while not main.done():
                await asyncio.wait({main}, timeout=args.sample_s)
                if not main.done():
                    sample = await snapshot(http, base, gw.pid)
                    sample["t_s"] = round(time.monotonic() - t0)
                    sample["sent"] = tally["sent"]
                    samples.append(sample)
                    print(f"  t={sample['t_s']:>4}s sent={tally['sent']:>7} rss={sample['rss_mb']} MB "
                          f"tasks={sample.get('event_loop_tasks')} fds={sample['fds_proc']} "
                          f"upstream_conns={sample.get('upstream_connections')} "
                          f"in_flight={sample.get('in_flight_requests')}", flush=True)
            await main
            elapsed = time.monotonic() - t0
            after = await settle(http, base, gw.pid, 15)
            print(f"after:  {after}", flush=True)
        code = await gw.stop(30)
        gw = None
    finally:
        if gw is not None:
            await gw.stop()
        await up.stop()
    result = {"args": vars(args), "before": before, "after": after, "samples": samples,
              "requests": dict(sorted(tally.items())), "rps": round(tally["sent"] / (args.warmup + elapsed), 1),
              "gateway_exit_code": code, **stored(tmp, (state or {}).get("database_url"))}
    result["verdict"] = verdict(result)
    return result


def late_rss_per_request(samples: list[dict[str, float]]) -> float | None:
    """RSS bytes per request over the last third of the run: a leak keeps it high, while bounded
    caches filling up early (the SQLite ledger remembers its last 100k settled ids, ~25 MB) fade."""
    if len(samples) < 3:
        return None
    first, last = samples[len(samples) * 2 // 3 - 1], samples[-1]
    requests = last["sent"] - first["sent"]
    return round((last["rss_mb"] - first["rss_mb"]) * 1024 * 1024 / requests, 1) if requests else None


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    before, after = r["before"], r["after"]
    wrong = {k: v for k, v in r["requests"].items() if ":wrong" in k}
    audited = sum(r["audit_records_by_outcome"].values())
    late = late_rss_per_request(r["samples"])
    checks = {
        "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
        "rss_bytes_per_request_last_third": late,
        "fd_delta": after["fds_proc"] - before["fds_proc"],
        # pooled keep-alive connections to the upstream come and go (bounded by the pool)
        "upstream_connection_delta": after.get("upstream_connections", 0) - before.get("upstream_connections", 0),
        "task_delta": after.get("event_loop_tasks", 0) - before.get("event_loop_tasks", 0),
        "upstream_connections_after": after.get("upstream_connections"),
        "in_flight_after": after.get("in_flight_requests"),
        "slots_in_use_after": after.get("active_requests"),
        "wrong_answers": wrong,
        "requests_sent": r["requests"].get("sent", 0),
        "requests_audited": audited,
        "gateway_exit_code": r["gateway_exit_code"],
    }
    checks["ok"] = (checks["fd_delta"] - checks["upstream_connection_delta"] <= 2 and checks["task_delta"] <= 0 and not wrong
                    and checks["in_flight_after"] == 0 and checks["slots_in_use_after"] == 0
                    and audited == checks["requests_sent"] and r["gateway_exit_code"] == 0
                    and (late if late is not None else checks["rss_growth_mb"] * 1024 * 1024 / max(1, checks[
                        "requests_sent"])) <= r["args"]["max_rss_bytes_per_request"])
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of measured load (default 3 minutes)")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the 'before' snapshot")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--abort-rate", type=float, default=0.10)
    ap.add_argument("--cut-rate", type=float, default=0.05)
    ap.add_argument("--sample-s", type=float, default=15.0, help="seconds between snapshots under load")
    ap.add_argument("--max-rss-bytes-per-request", type=float, default=512.0,
                    help="RSS growth per request over the last third of the run that still counts as flat "
                         "(a leaked request, tap or exchange is several KB)")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--redis", action="store_true", help="reservations and rate limits in the test Redis")
    ap.add_argument("--postgres", action="store_true", help="ledger and audit rows in the test PostgreSQL")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    with ExitStack() as stack:
        state = shared_state(stack, args, tmp) if args.redis or args.postgres else None
        result = asyncio.run(run(args, tmp, state))
    print(json.dumps({"requests": result["requests"], "rps": result["rps"],
                      "ledger_rows_by_status": result["ledger_rows_by_status"],
                      "audit_records_by_outcome": result["audit_records_by_outcome"],
                      "verdict": result["verdict"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if not args.keep_tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
