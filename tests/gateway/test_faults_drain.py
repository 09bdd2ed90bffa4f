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
import psycopg

from tests.gateway.faultkit import HI, wait_for
from tests.gatewayprocs import GatewayProcess, replica_config
from tests.harness import TENANT_KEY, UpstreamProcess, write_config
from tests.services import REDIS_URL, pg_schema, redis_prefix


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


def test_each_worker_of_a_multi_process_server_drains_the_same_way(tmp_path: Path, upstream: UpstreamProcess) -> None:
    """`gateway serve --workers 2` (shared PostgreSQL + Redis): every worker process turns /readyz
    503, lets the short stream finish, cuts the long one in-band at the grace deadline, flushes
    the ledger and audit rows, and the server exits 0."""
    with pg_schema() as pg_url, redis_prefix() as prefix:
        config = replica_config(upstream.url, tmp_path, pg_url, REDIS_URL, prefix)
        node = GatewayProcess(write_config(tmp_path, config), tmp_path / "gateway.log", args=["--workers", "2"], env={
            "GATEWAY_DRAIN_TIMEOUT_S": "2", "GATEWAY_DRAIN_READINESS_DELAY_S": "1.5",
            "GATEWAY_FLUSH_INTERVAL_S": "30"})  # nothing is written before shutdown flushes it
        outs: list[dict[str, Any]] = [{}, {}]
        started = [threading.Event(), threading.Event()]
        words = " ".join(f"w{i}" for i in range(400))
        threads = [
            threading.Thread(target=stream_lines, args=(node.url, {"text": words, "chunk_interval_ms": 50}, outs[0],
                                                        started[0])),
            threading.Thread(target=stream_lines, args=(node.url, {"text": "a b c d e f g h", "chunk_interval_ms": 150},
                                                        outs[1], started[1])),
        ]
        try:
            assert wait_for(lambda: node.log().count("Application startup complete.") == 2, timeout=30)  # both serve
            for thread in threads:
                thread.start()
            assert started[0].wait(15) and started[1].wait(15)
            t0 = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)

            def draining() -> bool:  # the supervisor passes the signal on within ~0.5 s
                try:
                    ready = httpx.get(f"{node.url}/readyz", timeout=1)
                except httpx.HTTPError:
                    return False  # no worker answers: not draining the way a load balancer can see
                return ready.status_code == 503 and "draining" in ready.json()["problems"]

            assert wait_for(draining, timeout=3)
            for thread in threads:
                thread.join(20)
            assert node.proc.wait(20) == 0
            took = time.monotonic() - t0
        finally:
            code = node.stop()
        assert code == 0 and took < 10, node.log()[-3000:]
        long_out, short_out = outs
        assert short_out["lines"][-1] == "data: [DONE]"  # finished within the grace period
        assert long_out["status"] == 200 and long_out["lines"][-1].startswith('data: {"error":')  # cut in-band
        assert "[DONE]" not in "".join(long_out["lines"])
        with psycopg.connect(pg_url, autocommit=True) as conn:
            ledger = conn.execute("SELECT status, output_tokens FROM ledger_entries ORDER BY output_tokens").fetchall()
            audit = conn.execute("SELECT record FROM audit_records ORDER BY seq").fetchall()
        assert [r[0] for r in ledger] == ["ok", "drain_deadline"] and ledger[1][1] > 0  # both settled
        outcomes = sorted(orjson.loads(r[0])["outcome"] for r in audit
                          if orjson.loads(r[0]).get("kind", "request") == "request")
        assert outcomes == ["drain_deadline", "ok"]
