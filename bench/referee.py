#!/usr/bin/env python3
"""The gateway in the referee harness (`../shared/bench/run_peer.py`), beside its peers, in one run.

    .venv/bin/python bench/referee.py [--peers floor-aiohttp,litellm] [--ref floor-aiohttp] \
        [--concurrency 1,16,64] [--duration 15] [--rounds 1] [-- extra run_peer.py flags]

Writes the same gateway config as bench/run.py (every pipeline stage on: auth, rate limits, a USD
budget, the policy with its content scan, audit hash chain, metrics), pointed at the harness's mock,
adds a `gateway` peer to the harness's own suite and runs `run_peer.py` with its interpreter
(`/tmp/peers/bench`, made by `../shared/bench/setup_peers.sh`). Prints the harness's tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import GATEWAY_KEY, write_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--bench-python", default=os.environ.get("BENCH_PY", "/tmp/peers/bench/bin/python"))
    ap.add_argument("--peers", default="floor-aiohttp,litellm", help="harness peers to run beside the gateway")
    ap.add_argument("--ref", default="floor-aiohttp")
    ap.add_argument("--mock-port", type=int, default=9000)
    ap.add_argument("--gateway-port", type=int, default=4400)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--duration", default="15")
    ap.add_argument("--rounds", default="1")
    ap.add_argument("--out", help="JSON results (run_peer.py --out)")
    args, extra = ap.parse_known_args(argv)
    if not Path(args.bench_python).exists():
        print(f"{args.bench_python} is missing: run `bash {args.harness}/setup_peers.sh` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gw-referee-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = write_config(tmp, f"http://127.0.0.1:{args.mock_port}/v1")
        suite = json.loads((args.harness / "peers" / "suite_local.json").read_text())
        suite["peers"].append({
            "name": "gateway",
            "url": f"http://127.0.0.1:{args.gateway_port}",
            "auth": f"Bearer {GATEWAY_KEY}",
            "model": "mock-gpt",
            "env": {"BENCH_UPSTREAM_KEY": "sk-bench-upstream", "GATEWAY_ADMIN_KEY": "gw-admin-bench"},
            "cmd": f"cd {ROOT} && exec {ROOT}/.venv/bin/python -m gateway serve --config {cfg}"
                   f" --host 127.0.0.1 --port {args.gateway_port}",
        })
        suite_file = tmp / "suite.json"
        suite_file.write_text(json.dumps(suite))
        only = ",".join([p for p in args.peers.split(",") if p] + ["gateway"])
        cmd = [args.bench_python, str(args.harness / "run_peer.py"), "--suite", str(suite_file), "--only", only,
               "--ref", args.ref, "--mock-port", str(args.mock_port), "--concurrency", args.concurrency,
               "--modes", args.modes, "--duration", args.duration, "--rounds", args.rounds, *extra]
        if args.out:
            cmd += ["--out", args.out]
        return subprocess.call(cmd, cwd=args.harness)


if __name__ == "__main__":
    raise SystemExit(main())
