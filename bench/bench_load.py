"""Load generators for bench/run.py: wrk (preferred) and a built-in closed-loop aiohttp driver."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path

import aiohttp

OVERHEAD_HEADER = "x-gateway-overhead-ms"

# Our wrk script: POST the body file, print one parseable line when wrk finishes.
WRK_LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTHORIZATION")
if auth and #auth > 0 then wrk.headers["Authorization"] = auth end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_WRK %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99),
    math.floor(latency.mean)))
end
"""


@dataclasses.dataclass
class LoadResult:
    tool: str  # "wrk" | "builtin"
    requests: int  # responses received (any status)
    errors: int  # non-2xx responses + socket errors/timeouts
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    overhead_p50_ms: float | None = None  # median x-gateway-overhead-ms seen (built-in driver only)
    overhead_samples: int = 0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_wrk(url: str, body_file: Path, lua_file: Path, auth: str, conc: int, duration: float,
                  pin: list[str]) -> LoadResult:
    secs = max(1, round(duration))
    env = dict(os.environ, BENCH_BODY_FILE=str(body_file), BENCH_AUTHORIZATION=auth)
    proc = await asyncio.create_subprocess_exec(
        *pin, "wrk", "-t1", f"-c{conc}", f"-d{secs}s", "--timeout", "30s", "-s", str(lua_file), url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), secs + 60)
    finally:
        if proc.returncode is None:  # cancelled (SIGTERM, Ctrl-C) or timed out: do not leave wrk running
            proc.kill()
            await proc.wait()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCH_WRK "):
            n, dur_us, sock_err, non2xx, p50, p99, mean = (int(x) for x in line.split()[1:])
            elapsed = dur_us / 1e6
            return LoadResult("wrk", n, sock_err + non2xx, elapsed, n / elapsed if elapsed else 0.0,
                              p50 / 1000, p99 / 1000, mean / 1000)
    raise RuntimeError("wrk printed no BENCH_WRK line:\n" + out.decode(errors="replace"))


async def run_builtin(url: str, body: bytes, auth: str, conc: int, duration: float,
                      max_requests: int | None = None) -> LoadResult:
    """Closed loop: conc workers, each sends the next request when the previous answer has been read
    to the end (whole SSE stream included). Stops starting requests after duration (or max_requests)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    latencies: list[float] = []
    overheads: list[float] = []
    counts = {"errors": 0, "started": 0}
    connector = aiohttp.TCPConnector(limit=conc, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline and (max_requests is None or counts["started"] < max_requests):
            counts["started"] += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok = 200 <= r.status < 300
                    hdr = r.headers.get(OVERHEAD_HEADER)
            except (aiohttp.ClientError, TimeoutError):
                counts["errors"] += 1
                await asyncio.sleep(0.01)
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            if not ok:
                counts["errors"] += 1
            if hdr:
                try:
                    overheads.append(float(hdr))
                except ValueError:
                    pass

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        await asyncio.gather(*(worker(session) for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return LoadResult("builtin", len(latencies), counts["errors"], elapsed, len(latencies) / elapsed,
                      percentile(latencies, 0.50), percentile(latencies, 0.99),
                      statistics.fmean(latencies) if latencies else float("nan"),
                      statistics.median(overheads) if overheads else None, len(overheads))
