"""Exact settlement and soft alerts on replicas sharing PostgreSQL and Redis (issue 5)."""
from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson

from tests.gateway.test_replicas import BODY, set_tenant, wait_until
from tests.gatewayprocs import Cluster, cluster
from tests.harness import ROOT, TENANT_KEY, UpstreamProcess


def rows_by_request(c: Cluster) -> dict[str, tuple[Any, ...]]:
    rows = c.query("SELECT request_id, attempt, input_tokens, output_tokens, cached_input_tokens, cost_usd,"
                   " usage_estimated, status FROM ledger_entries")
    return {r[0]: r[1:] for r in rows}


def test_settlement_is_exact_on_every_path_and_report_totals_match(tmp_path: Path, upstream: UpstreamProcess) -> None:
    with cluster(upstream.url, tmp_path, 2, edit=lambda c: set_tenant(
            c, budgets=[{"window": "month", "max_usd": 10}], rate_limits={"tokens_per_minute": 1_000_000})) as c:
        a, b = (openai.OpenAI(base_url=n.v1, api_key=TENANT_KEY, max_retries=0) for n in c.nodes)
        expected: dict[str, tuple[int, int, bool]] = {}

        plain = a.chat.completions.with_raw_response.create(**BODY)
        usage = plain.parse().usage
        assert usage is not None
        expected[plain.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens, False)

        with_usage = b.chat.completions.with_raw_response.create(
            **BODY, stream=True, stream_options={"include_usage": True})
        chunks = list(with_usage.parse())
        [last] = [ch.usage for ch in chunks if ch.usage is not None]
        expected[with_usage.headers["x-request-id"]] = (last.prompt_tokens, last.completion_tokens, False)

        bare = b.chat.completions.with_raw_response.create(**BODY, stream=True)  # client asked no usage
        assert all(ch.usage is None for ch in bare.parse())
        expected[bare.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens, False)

        upstream.script({"omit_usage": True, "text": "one two three"})
        counted = a.chat.completions.with_raw_response.create(**BODY, stream=True)
        list(counted.parse())

        claude = anthropic.Anthropic(base_url=c.nodes[1].url, api_key=TENANT_KEY, max_retries=0)
        message = claude.messages.with_raw_response.create(
            model="mock-a", max_tokens=64, messages=[{"role": "user", "content": "hello budget"}])
        m_usage = message.parse().usage
        expected[message.headers["x-request-id"]] = (m_usage.input_tokens, m_usage.output_tokens, False)
        with claude.messages.stream(model="mock-a", max_tokens=64,
                                    messages=[{"role": "user", "content": "hello budget"}]) as stream:
            final = stream.get_final_message()
            streamed_id = stream.response.headers["x-request-id"]
        expected[streamed_id] = (final.usage.input_tokens, final.usage.output_tokens, False)

        upstream.script({"status": 500})  # a retry: one row, for the attempt that answered
        retried = a.chat.completions.with_raw_response.create(**BODY)
        expected[retried.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens, False)

        rows = wait_until(lambda: (r := rows_by_request(c)) and len(r) == 7 and r)
        for request_id, (tokens_in, tokens_out, estimated) in expected.items():
            _attempt, r_in, r_out, cached, _cost, r_estimated, status = rows[request_id]
            assert (r_in + cached, r_out, r_estimated, status) == (tokens_in, tokens_out, estimated, "ok")
        assert rows[retried.headers["x-request-id"]][0] == 2
        assert rows[counted.headers["x-request-id"]][5] is True  # counted by the gateway
        # Stream and non-stream cost the same for the same usage.
        costs = {rows[r][4] for r in (plain.headers["x-request-id"], with_usage.headers["x-request-id"],
                                      bare.headers["x-request-id"], retried.headers["x-request-id"])}
        assert len(costs) == 1
        # The FinOps report is the sum of the ledger rows, to the last digit.
        total = sum((Decimal(r[4]) for r in rows.values()), Decimal(0))
        report = subprocess.run([sys.executable, "-m", "gateway", "spend", "--config", str(c.config_path),
                                 "--by", "tenant", "--format", "json"], cwd=ROOT, capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, check=True)
        [team] = orjson.loads(report.stdout)
        assert Decimal(team["cost_usd"]) == total.quantize(Decimal("1e-9"))
        assert team["requests"] == 7


def test_client_disconnect_settles_what_was_produced(tmp_path: Path, upstream: UpstreamProcess) -> None:
    with cluster(upstream.url, tmp_path, 1, edit=lambda c: set_tenant(
            c, budgets=[{"window": "day", "max_usd": 10}], rate_limits={})) as c:
        upstream.script({"text": " ".join(f"w{i}" for i in range(200)), "chunk_interval_ms": 20})
        with httpx.Client(timeout=10) as http, http.stream(
                "POST", f"{c.nodes[0].v1}/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                json={**BODY, "stream": True}) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            request_id = resp.headers["x-request-id"]
        row = wait_until(lambda: rows_by_request(c).get(request_id))
        assert row[6] == "client_disconnected" and 0 < row[2] < 200 and row[5] is True
        held = wait_until(lambda: c.query("SELECT count(*) FROM ledger_entries")[0][0] == 1)
        assert held


def test_alert_thresholds_fire_once_per_window_across_replicas(tmp_path: Path, upstream: UpstreamProcess) -> None:
    body = {**BODY, "max_tokens": 8}
    with cluster(upstream.url, tmp_path, 2, edit=lambda c: set_tenant(
            c, rate_limits={},
            budgets=[{"window": "day", "max_tokens": 200, "alert_at": [0.25, 0.5]}])) as c:
        clients = [openai.OpenAI(base_url=n.v1, api_key=TENANT_KEY, max_retries=0) for n in c.nodes]
        spent = 0
        for i in range(12):  # alternate replicas until half the budget is settled
            usage = clients[i % 2].chat.completions.create(**body).usage
            assert usage is not None
            spent += usage.total_tokens
            if spent >= 100:
                break
        assert spent >= 100

        def fired() -> dict[str, float]:
            counts: dict[str, float] = {}
            for node in c.nodes:
                text = httpx.get(f"{node.url}/metrics").text
                for match in re.finditer(r'gateway_budget_alerts_total\{([^}]*)\} ([0-9.]+)', text):
                    fraction = re.search(r'fraction="([^"]+)"', match.group(1))
                    assert fraction is not None and 'kind="tokens"' in match.group(1)
                    counts[fraction.group(1)] = counts.get(fraction.group(1), 0) + float(match.group(2))
            return counts

        assert wait_until(lambda: fired() == {"0.25": 1.0, "0.5": 1.0} and fired())
        logs = "".join(node.log() for node in c.nodes)
        events = [orjson.loads(line) for line in logs.splitlines()
                  if line.startswith("{") and '"budget alert"' in line]
        assert sorted(e["threshold"] for e in events) == ["0.25", "0.5"]
        assert all(e["tenant"] == "team" and e["window"] == "day" for e in events)
        clients[0].chat.completions.create(**body)  # more spend in the same window: no new event
        assert fired() == {"0.25": 1.0, "0.5": 1.0}
