#!/usr/bin/env python3
"""Direct-vs-gateway benchmark on loopback: how much latency and CPU does the gateway add?

Starts tests/fakeupstream.py (pinned to CPU 0), writes a temporary gateway config (one
openai_compatible provider pointing at the fake, model mock-gpt, tenant bench), starts the gateway
(`python -m gateway serve ...`, pinned to CPU 1; or --gateway-cmd), waits until a real POST through
it returns 200, then for every mode and concurrency runs a closed-loop load directly against the fake
and through the gateway and prints one table. Uses wrk when installed, else a built-in aiohttp driver.

  .venv/bin/python bench/run.py                                   # the real gateway
  .venv/bin/python bench/run.py --duration 5 --json /tmp/b.json \\
      --gateway-cmd '{python} bench/passthrough.py --port {port} --upstream {upstream_api}'

--gateway-cmd runs under bash in the repository root; {python} {config} {host} {port} {upstream}
{upstream_api} {repo} are substituted (also exported as BENCH_* variables). See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_load import WRK_LUA, LoadResult, run_builtin, run_wrk, wrk_available
from bench_procs import (
    HZ,
    NCPU,
    Proc,
    cpu_ticks,
    free_port,
    machine_busy_ticks,
    own_ticks,
    pin_prefix,
    proc_tree,
    rss_mb,
)
from bench_report import render

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakeupstream.py"
GATEWAY_KEY = "gw-bench-key"
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "mock-gpt"


def request_bodies() -> dict[str, dict[str, Any]]:
    base = {"model": MODEL, "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write one short sentence about benchmarking HTTP gateways on loopback."}]}
    return {"nonstream": base, "stream": dict(base, stream=True, stream_options={"include_usage": True})}


def write_config(tmp: Path, upstream_api: str) -> Path:
    """Gateway config per CONTRACT section 3 (YAML written by hand: the harness needs no PyYAML)."""
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "policies" / "default.yaml").write_text(
        'name: default\nroutes:\n  - name: direct\n    when: {model: "*"}\n    candidates: ["$requested"]\n')
    key_hash = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"""state:
  database_url: sqlite:///{tmp / 'state.db'}
  redis_url: null
audit:
  log_bodies: false
  retention_days: 30
providers:
  - name: mock
    type: openai_compatible
    base_url: {upstream_api}
    api_key_env: BENCH_UPSTREAM_KEY
    locality: local
    timeout_s: 60
models:
  - name: {MODEL}
    provider: mock
    upstream_model: {MODEL}
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    context_window: 128000
    max_output_tokens: 16384
    quality: 1
    data_boundary: local
    capabilities: [chat, tools, json]
tenants:
  - id: bench
    api_keys_sha256: ["{key_hash}"]
    policy: default
    allowed_models: ["*"]
    data_class: internal
    budgets:
      - {{window: day, max_usd: 1000000}}
    rate_limits: {{requests_per_minute: 10000000, tokens_per_minute: 10000000}}
policies_dir: policies
admin_api_key_env: GATEWAY_ADMIN_KEY
""")
    return cfg


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.a, self.tmp = args, tmp
        self.use_wrk = args.loadgen == "wrk" or args.loadgen == "auto" and wrk_available()
        self.client_pin = pin_prefix(args.client_cpus)
        self.bodies = {m: json.dumps(b).encode() for m, b in request_bodies().items()}
        for mode, raw in self.bodies.items():
            (tmp / f"{mode}.json").write_bytes(raw)
        (tmp / "post.lua").write_text(WRK_LUA)
        self.up: Proc | None = None
        self.gw: Proc | None = None
        self.up_url = self.gw_url = ""
        self.info: dict[str, Any] = {}
        self.http: aiohttp.ClientSession | None = None

    # -- lifecycle
    async def start_upstream(self) -> None:
        argv = [*pin_prefix(self.a.client_cpus), sys.executable, str(FAKE), "--port", "0", "--record-limit", "0",
                "--delay-ms", str(self.a.delay_ms)]
        self.up = await Proc("fakeupstream", argv, log=self.tmp / "upstream.log", pipe_stdout=True).start()
        port = await self.up.read_ready(30)
        self.up_url = f"http://127.0.0.1:{port}"

    async def start_gateway(self) -> None:
        port = free_port()
        cfg = write_config(self.tmp, self.up_url + "/v1")
        subst = {"python": sys.executable, "config": str(cfg), "host": "127.0.0.1", "port": str(port),
                 "upstream": self.up_url, "upstream_api": self.up_url + "/v1", "repo": str(REPO)}
        env = dict(os.environ, BENCH_UPSTREAM_KEY=UPSTREAM_KEY, GATEWAY_ADMIN_KEY="bench-admin-key",
                   **{f"BENCH_{k.upper()}": v for k, v in subst.items()})
        if self.a.gateway_cmd:
            cmd = self.a.gateway_cmd
            for k, v in subst.items():
                cmd = cmd.replace("{" + k + "}", v)
            argv = ["bash", "-c", cmd]
        else:
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--host", "127.0.0.1",
                    "--port", str(port)]
        self.info["gateway_cmd"] = " ".join(argv) if not self.a.gateway_cmd else argv[2]
        self.gw = await Proc("gateway", [*pin_prefix(self.a.gateway_cpus), *argv], env=env, cwd=str(REPO),
                             log=self.tmp / "gateway.log").start()
        self.gw_url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        await self.wait_ready()
        self.info["gateway_ready_s"] = round(time.monotonic() - t0, 2)
        self.info["gateway_idle_rss_mb"] = rss_mb(proc_tree(self.gw.pid))
        self.info["stream_smoke"] = await self.stream_smoke()

    async def post(self, url: str, mode: str, auth: str) -> tuple[int, bytes]:
        assert self.http is not None
        async with self.http.post(url + "/v1/chat/completions", data=self.bodies[mode],
                                  headers={"Authorization": auth, "Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    async def wait_ready(self) -> None:
        assert self.gw is not None
        deadline, last = time.monotonic() + self.a.ready_timeout, ""
        while time.monotonic() < deadline:
            if not self.gw.alive():
                raise RuntimeError(f"the gateway exited (code {self.gw.proc.returncode if self.gw.proc else '?'})"
                                   + self.gw.log_tail())
            try:
                status, body = await self.post(self.gw_url, "nonstream", "Bearer " + GATEWAY_KEY)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:300]!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.25)
        raise RuntimeError(f"gateway not ready after {self.a.ready_timeout} s: {last}" + self.gw.log_tail())

    async def stream_smoke(self) -> str:
        status, body = await self.post(self.gw_url, "stream", "Bearer " + GATEWAY_KEY)
        done, usage = body.rstrip().endswith(b"data: [DONE]"), b'"usage":{' in body
        return f"HTTP {status}, [DONE] {'yes' if done else 'NO'}, usage chunk {'yes' if usage else 'NO'}"

    # -- measurement
    async def upstream_count(self) -> int:
        assert self.http is not None
        async with self.http.get(self.up_url + "/__stats") as r:
            return int((await r.json())["requests"])

    async def drain(self, pid: int | None, timeout: float = 30.0) -> float:
        """Wait until requests abandoned by the load generator are finished: the upstream counter is stable
        and the gateway tree is nearly idle (< 5 % of a core over 0.25 s)."""
        t0 = time.monotonic()
        last_n, last_c = await self.upstream_count(), cpu_ticks(proc_tree(pid)) if pid else 0
        while time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.25)
            n, c = await self.upstream_count(), cpu_ticks(proc_tree(pid)) if pid else 0
            if n == last_n and c - last_c <= 0.25 * HZ * 0.05:
                break
            last_n, last_c = n, c
        return time.monotonic() - t0

    async def load(self, url: str, auth: str, mode: str, conc: int, duration: float) -> LoadResult:
        target = url + "/v1/chat/completions"
        if self.use_wrk:
            return await run_wrk(target, self.tmp / f"{mode}.json", self.tmp / "post.lua", auth, conc, duration,
                                 self.client_pin)
        return await run_builtin(target, self.bodies[mode], auth, conc, duration)

    async def measure(self, who: str, mode: str, conc: int) -> dict[str, Any]:
        assert self.up is not None and self.gw is not None
        gateway = who == "gateway"
        url, auth = (self.gw_url, "Bearer " + GATEWAY_KEY) if gateway else (self.up_url, "Bearer " + UPSTREAM_KEY)
        pid = self.gw.pid if gateway else None
        if self.a.warmup > 0:
            await self.load(url, auth, mode, conc, self.a.warmup)
        await self.drain(pid)
        tree = proc_tree(pid) if pid else []
        n0, g0, u0 = await self.upstream_count(), cpu_ticks(tree), cpu_ticks([self.up.pid])
        m0, d0, t0 = machine_busy_ticks(), own_ticks(), time.monotonic()
        res = await self.load(url, auth, mode, conc, self.a.duration)
        drain_s = await self.drain(pid)
        tree2 = proc_tree(pid) if pid else []
        n1, g1, u1 = await self.upstream_count(), cpu_ticks(set(tree) | set(tree2)), cpu_ticks([self.up.pid])
        m1, d1, el = machine_busy_ticks(), own_ticks(), time.monotonic() - t0
        fwd = max(1, n1 - n0)
        # busy time of the box not spent in the gateway, the fake or the load generator: other tenants
        background = max(0.0, (m1 - m0) - (g1 - g0) - (u1 - u0) - (d1 - d0))
        out: dict[str, Any] = dataclasses.asdict(res)
        out.update(upstream_requests=n1 - n0, drain_s=round(drain_s, 2),
                   upstream_cpu_ms_per_req=round((u1 - u0) / HZ * 1000 / fwd, 4),
                   bg_cpu_pct=round(100.0 * background / (el * HZ * NCPU), 1))
        if gateway:
            out.update(cpu_ms_per_req=round((g1 - g0) / HZ * 1000 / fwd, 4),
                       cpu_util_pct=round(100.0 * (g1 - g0) / (el * HZ), 1), rss_mb=rss_mb(tree2),
                       fwd_pct=round(100.0 * (n1 - n0) / max(1, res.requests), 1))
            if res.overhead_samples == 0 and self.a.overhead_samples > 0:  # wrk does not read headers
                sample = await run_builtin(url + "/v1/chat/completions", self.bodies[mode], auth, conc, 30.0,
                                           max_requests=self.a.overhead_samples)
                out.update(overhead_p50_ms=sample.overhead_p50_ms, overhead_samples=sample.overhead_samples)
                await self.drain(pid)
        return out

    async def run(self) -> dict[str, Any]:
        a = self.a
        self.info.update(started=time.strftime("%Y-%m-%d %H:%M:%S"), cpu_model=cpu_model(), ncpu=NCPU,
                         load_generator="wrk -t1" if self.use_wrk else "built-in aiohttp closed loop"
                         + (" (wrk not found)" if a.loadgen == "auto" else ""),
                         duration_s=a.duration, warmup_s=a.warmup, delay_ms=a.delay_ms,
                         client_cpus=a.client_cpus if self.client_pin else "",
                         gateway_cpus=a.gateway_cpus if pin_prefix(a.gateway_cpus) else "",
                         loadavg_start=", ".join(f"{x:.2f}" for x in os.getloadavg()))
        if not self.use_wrk and a.loadgen == "auto":
            print("wrk not found on PATH: using the built-in aiohttp load generator (more client CPU, lower "
                  "ceiling; apt-get install wrk for better numbers)", file=sys.stderr)
        if self.client_pin and not self.use_wrk:
            os.sched_setaffinity(0, {int(c) for c in a.client_cpus.split(",")})  # built-in driver shares CPU 0
        rows: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as self.http:
            try:
                await self.start_upstream()
                await self.start_gateway()
                print(f"gateway ready after {self.info['gateway_ready_s']} s; stream smoke: "
                      f"{self.info['stream_smoke']}", file=sys.stderr)
                for mode in a.modes.split(","):
                    for conc in (int(c) for c in a.concurrency.split(",")):
                        row = {"mode": mode, "conc": conc, "direct": await self.measure("direct", mode, conc),
                               "gateway": await self.measure("gateway", mode, conc)}
                        rows.append(row)
                        d, g = row["direct"], row["gateway"]
                        print(f"[{mode} c={conc}] direct {d['rps']:.0f} rps p50 {d['p50_ms']:.2f} ms | gateway "
                              f"{g['rps']:.0f} rps p50 {g['p50_ms']:.2f} ms, {g['cpu_ms_per_req']:.3f} CPU-ms/req",
                              file=sys.stderr)
            finally:
                for proc in (self.gw, self.up):
                    if proc is not None:
                        await proc.stop()
        self.info["loadavg_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        return {"info": self.info, "args": vars(a), "rows": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="direct vs through-the-gateway benchmark against tests/fakeupstream.py",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--modes", default="nonstream,stream", help="comma list of nonstream, stream")
    ap.add_argument("--concurrency", default="1,16,64", help="comma list of closed-loop concurrencies")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load before each run")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--gateway-cmd", help="shell command starting the gateway instead of `python -m gateway serve`")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="fake upstream latency per request")
    ap.add_argument("--loadgen", choices=["auto", "wrk", "builtin"], default="auto")
    ap.add_argument("--overhead-samples", type=int, default=200,
                    help="requests sampled for x-gateway-overhead-ms when wrk is the load generator")
    ap.add_argument("--client-cpus", default="0", help="CPUs for the fake upstream and the load generator")
    ap.add_argument("--gateway-cpus", default="1", help="CPUs for the gateway process tree")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, logs)")
    args = ap.parse_args(argv)
    if args.loadgen == "wrk" and not wrk_available():
        ap.error("--loadgen wrk: wrk not on PATH")
    if not set(args.modes.split(",")) <= {"nonstream", "stream"}:
        ap.error("--modes takes nonstream and/or stream")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that stop our children
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    keep = args.keep_tmp
    try:
        result = asyncio.run(Bench(args, tmp).run())
        print(render(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}\n(temp dir with config and logs kept: {tmp})", file=sys.stderr)
        keep = True
        return 1
    finally:
        if keep:
            print(f"temp dir: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
