"""Issue 6: graceful drain of a real `gateway serve` process. SIGTERM: /readyz turns 503 and new
requests are refused, in-flight streams finish or are cut at the grace deadline with in-band
errors, ledger and audit buffers are flushed, exit code 0; nothing admitted is left unsettled."""
from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.gateway.faultkit import HI, wait_for
from tests.gatewayprocs import GatewayProcess
from tests.harness import TENANT_KEY, UpstreamProcess, write_config


def stream_lines(url: str, fake: dict[str, Any], out: dict[str, Any], started: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                          json={"model": "mock-a", "stream": True, "messages": HI, "x_fake": fake},
                          timeout=30) as resp:
            out["status"] = resp.status_code
            lines = []
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
            out["lines"] = lines
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        started.set()


def test_sigterm_drains_streams_then_cuts_them_in_band_and_exits_0(
        tmp_path: Path, gw_config: dict[str, Any], upstream: UpstreamProcess) -> None:
    path = write_config(tmp_path, gw_config)
    node = GatewayProcess(path, tmp_path / "gateway.log", env={
        "GATEWAY_DRAIN_TIMEOUT_S": "2", "GATEWAY_DRAIN_READINESS_DELAY_S": "0.8",
        "GATEWAY_FLUSH_INTERVAL_S": "30"})  # nothing is written before shutdown flushes it
    long_out: dict[str, Any] = {}
    short_out: dict[str, Any] = {}
    long_started, short_started = threading.Event(), threading.Event()
    words = " ".join(f"w{i}" for i in range(400))
    threads = [
        threading.Thread(target=stream_lines, args=(node.url, {"text": words, "chunk_interval_ms": 50}, long_out,
                                                    long_started)),
        threading.Thread(target=stream_lines, args=(node.url, {"text": "a b c d e f g h", "chunk_interval_ms": 100},
                                                    short_out, short_started)),
    ]
    try:
        for thread in threads:
            thread.start()
        assert long_started.wait(10) and short_started.wait(10)
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{node.url}/readyz", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.json()["problems"]
        refused = httpx.post(f"{node.url}/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                             json={"model": "mock-a", "messages": HI}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        for thread in threads:
            thread.join(15)
        assert node.proc.wait(15) == 0
        took = time.monotonic() - t0
    finally:
        code = node.stop()
    assert code == 0 and took < 6
    assert short_out["lines"][-1] == "data: [DONE]"  # finished within the grace period
    assert long_out["status"] == 200 and long_out["lines"][-1].startswith('data: {"error":')  # cut in-band
    assert "[DONE]" not in "".join(long_out["lines"])
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        rows = conn.execute("SELECT status, output_tokens FROM ledger_entries ORDER BY output_tokens").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == ["ok", "drain_deadline"] and rows[1][1] > 0  # both settled, tokens counted
    audit = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    outcomes = sorted(r["outcome"] for r in audit if r.get("kind", "request") == "request")
    assert outcomes == ["drain_deadline", "error", "ok"]  # the refused request is audited too
    assert wait_for(lambda: upstream.attempts() and all(a["ended"] for a in upstream.attempts()))
