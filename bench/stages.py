#!/usr/bin/env python3
"""Per-stage cost of the request path, in process, without HTTP: where the gateway's own
microseconds go (auth, parse, rate limit, balance, policy, reserve, settle+audit+metrics).

    .venv/bin/python bench/stages.py [--n 20000] [--prompt-words 40]

Prints a table of mean microseconds per call for each stage. The upstream call and the
HTTP server are not included (bench/run.py measures those end to end).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starlette.requests import Request

from adapters.base import Usage
from gateway import pipeline
from gateway.config import load_config
from gateway.dispatch import Target
from gateway.parsing import parse_chat
from gateway.relay import Exchange, finish_exchange
from gateway.runtime import Runtime
from gateway.settings import Settings

KEY = "gw-stage-bench-key"


def write_config(tmp: Path) -> Path:
    (tmp / "policies").mkdir()
    (tmp / "policies" / "default.yaml").write_text(yaml.safe_dump({"name": "default", "routes": [
        {"name": "fast", "when": {"model": "fast"}, "candidates": ["model-a", "model-b"], "objective": "cheapest"},
        {"name": "direct", "when": {"model": "*"}, "candidates": ["$requested"]}]}))
    config = {
        "state": {"database_url": f"sqlite:///{tmp / 'state.db'}"},
        "providers": [{"name": "up", "type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1",
                       "locality": "local"}],
        "models": [{"name": n, "provider": "up", "upstream_model": n, "input_usd_per_mtok": p,
                    "output_usd_per_mtok": p * 4, "data_boundary": "local"} for n, p in (("model-a", 1), ("model-b", 2))],
        "tenants": [{"id": "t", "api_keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()],
                     "budgets": [{"window": "day", "max_usd": 1_000_000}, {"window": "month", "max_tokens": 10**12}],
                     "rate_limits": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}}],
        "policies_dir": "policies/",
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_request(body: bytes) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


async def timed(n: int, fn: Callable[[int], Awaitable[Any]]) -> float:
    for i in range(min(200, n)):
        await fn(i)
    start = time.perf_counter()
    for i in range(n):
        await fn(i)
    return (time.perf_counter() - start) / n * 1e6


async def run(n: int, words: int) -> list[tuple[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="gw-stages-"))
    rt = Runtime(load_config(write_config(tmp)), Settings(flush_interval_s=0.05))
    await rt.start()
    body = orjson.dumps({"model": "fast", "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " ".join(f"word{i}" for i in range(words))}]})
    request = make_request(body)
    parsed = parse_chat(body)
    key, tenant = await pipeline.authenticate(rt, request, Exchange.begin("x", "chat"))
    results: list[tuple[str, float]] = []

    async def stage_request_id(i: int) -> Any:
        return pipeline.request_id(rt, make_request(body))

    async def stage_auth(i: int) -> Any:
        return await pipeline.authenticate(rt, request, Exchange.begin("x", "chat"))

    async def stage_parse(i: int) -> Any:
        return parse_chat(body)

    async def stage_rate(i: int) -> Any:
        return await pipeline.rate_limit(rt, tenant, key, parsed, Exchange.begin("x", "chat"))

    async def stage_balance(i: int) -> Any:
        return await pipeline.read_balance(rt, tenant)

    budget_left = await pipeline.read_balance(rt, tenant)

    async def stage_decide(i: int) -> Any:
        return pipeline.decide(rt, tenant, key, parsed, request, Exchange.begin("x", "chat"), budget_left)

    decision = pipeline.decide(rt, tenant, key, parsed, request, Exchange.begin("x", "chat"), budget_left)
    targets = [Target(rt.models[m], rt.endpoints[rt.models[m].provider]) for m in decision.candidates]

    async def stage_reserve_finish(i: int) -> Any:
        ex = Exchange.begin(f"req-{i}", "chat")
        ex.tenant, ex.key_id, ex.parsed, ex.decision = tenant.config.id, key.id, parsed, decision
        await pipeline.reserve(rt, tenant, parsed, targets, ex)
        ex.target = targets[0]
        await finish_exchange(rt, ex, error=None, usage=Usage(input_tokens=40, output_tokens=60))

    for name, fn in (("request id", stage_request_id), ("authenticate", stage_auth), ("parse + count tokens", stage_parse),
                     ("rate limit", stage_rate), ("budget balance", stage_balance), ("policy decision", stage_decide),
                     ("reserve + settle + audit + metrics", stage_reserve_finish)):
        results.append((name, await timed(n, fn)))
    flush_start = time.process_time()
    await rt.close()
    results.append(("(close: flush what was queued, CPU s)", time.process_time() - flush_start))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--prompt-words", type=int, default=40)
    args = ap.parse_args()
    try:
        import uvloop
        rows = uvloop.run(run(args.n, args.prompt_words))
    except ImportError:
        rows = asyncio.run(run(args.n, args.prompt_words))
    width = max(len(name) for name, _ in rows)
    print(f"{'stage'.ljust(width)}  mean µs/request (on the event loop)")
    total = 0.0
    for name, value in rows:
        if name.startswith("("):
            print(f"{name.ljust(width)}  {value:8.3f}")
            continue
        total += value
        print(f"{name.ljust(width)}  {value:8.1f}")
    print(f"{'sum of stages'.ljust(width)}  {total:8.1f}")


if __name__ == "__main__":
    main()
