#!/usr/bin/env python3
"""Minimal aiohttp pass-through proxy: the "Python floor" for bench/run.py.

Does the least a gateway must: check the bearer key, parse the JSON body (model, stream), forward it
to one upstream with a pooled client, relay the answer (SSE chunk by chunk), and report its own
time as x-gateway-overhead-ms (handler time minus time waiting for the upstream).

  python bench/passthrough.py --port 4100 --upstream http://127.0.0.1:9000/v1 [--key gw-bench-key]
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web

DENY = b'{"error":{"message":"invalid api key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(upstream: str, key: str, upstream_key: str) -> web.Application:
    expected = "Bearer " + key
    out_headers = {"Content-Type": "application/json", "Authorization": "Bearer " + upstream_key}

    async def forward(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        if request.headers.get("Authorization") != expected:
            return web.Response(body=DENY, status=401, content_type="application/json")
        body = await request.read()
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return web.Response(body=b'{"error":{"message":"model required"}}', status=400,
                                content_type="application/json")
        stream = req.get("stream") is True
        t_send = time.perf_counter()
        async with request.app[SESSION].post(upstream + request.path[3:], data=body, headers=out_headers) as r:
            ctype = r.headers.get("Content-Type", "application/json")
            if not stream or r.status != 200:
                data = await r.read()
                t_back = time.perf_counter()
                overhead = (t_send - t0) + (time.perf_counter() - t_back)
                return web.Response(body=data, status=r.status, headers={
                    "Content-Type": ctype, "x-gateway-overhead-ms": f"{overhead * 1000:.3f}"})
            t_back = time.perf_counter()
            resp = web.StreamResponse(status=200, headers={
                "Content-Type": ctype, "Cache-Control": "no-cache",
                "x-gateway-overhead-ms": f"{((t_send - t0) + (time.perf_counter() - t_back)) * 1000:.3f}"})
            await resp.prepare(request)
            async for piece in r.content.iter_any():
                await resp.write(piece)
            await resp.write_eof()
            return resp

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=60))
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/{tail:.*}", forward)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="minimal aiohttp pass-through LLM proxy (benchmark floor)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="upstream API base, e.g. http://127.0.0.1:9000/v1")
    ap.add_argument("--key", default="gw-bench-key", help="the bearer key clients must send")
    args = ap.parse_args()
    app = make_app(args.upstream.rstrip("/"), args.key, os.environ.get("BENCH_UPSTREAM_KEY", "sk-bench-upstream"))
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
