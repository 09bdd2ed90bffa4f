"""Store outages fail closed and recover without a restart (issue 5, guarantee 6).

The gateway process reaches PostgreSQL and Redis through loopback proxies the test cuts
and restores, so the shared services other tests use are never touched."""
from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.gateway.test_replicas import BODY, set_tenant, wait_until
from tests.gatewayprocs import cluster
from tests.harness import TENANT_KEY, UpstreamProcess
from tests.services import PG_URL, REDIS_URL, require
from tests.tcpproxy import TcpProxy, proxy_for

OPENAI = {"authorization": f"Bearer {TENANT_KEY}"}
ANTHROPIC = {"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "mock-a", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def _ask(base: str) -> tuple[httpx.Response, httpx.Response]:
    with httpx.Client(timeout=20) as http:
        return (http.post(f"{base}/v1/chat/completions", json=BODY, headers=OPENAI),
                http.post(f"{base}/v1/messages", json=MESSAGE, headers=ANTHROPIC))


def _all_503(base: str) -> bool:
    answers = _ask(base)
    return all(a.status_code == 503 for a in answers)


def _all_ok(base: str) -> bool:
    return all(a.status_code == 200 for a in _ask(base))


def test_redis_then_postgres_down_fail_closed_spool_and_recover(tmp_path: Path, upstream: UpstreamProcess) -> None:
    require(PG_URL), require(REDIS_URL)
    with ExitStack() as stack:
        pg = stack.enter_context(proxy_for(PG_URL))
        redis = stack.enter_context(proxy_for(REDIS_URL))

        def via_proxies(config: dict) -> None:  # type: ignore[type-arg]
            set_tenant(config, budgets=[{"window": "day", "max_usd": 10}], rate_limits={"requests_per_minute": 1000})
            config["state"]["database_url"] = pg.url_for(config["state"]["database_url"])
            config["state"]["redis_url"] = redis.url_for(REDIS_URL)

        c = stack.enter_context(cluster(upstream.url, tmp_path, 1, edit=via_proxies))
        base = c.nodes[0].url
        assert _all_ok(base)

        _redis_outage(base, redis)
        _postgres_outage(base, pg, c, upstream, tmp_path)


def _redis_outage(base: str, redis: TcpProxy) -> None:
    redis.cut()
    oa, an = _ask(base)
    assert (oa.status_code, an.status_code) == (503, 503)  # never admitted unmetered, never 401
    assert int(oa.headers["retry-after"]) >= 1 and int(an.headers["retry-after"]) >= 1
    assert oa.json()["error"]["code"] == "service_unavailable"
    assert an.json()["type"] == "error" and an.json()["error"]["type"] == "overloaded_error"
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 503 and any("redis" in p for p in ready.json()["problems"])
    redis.restore()
    assert wait_until(lambda: _all_ok(base))  # no restart
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def _postgres_outage(base: str, pg: TcpProxy, c, upstream: UpstreamProcess, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    before = c.query("SELECT count(*) FROM ledger_entries")[0][0]
    upstream.script({"delay_ms": 1500})

    async def in_flight_across_the_cut() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            task = asyncio.create_task(http.post(f"{base}/v1/chat/completions", json=BODY,
                                                 headers={**OPENAI, "x-request-id": "req-during-outage"}))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg.cut)
            return await task

    answer = asyncio.run(in_flight_across_the_cut())
    assert answer.status_code == 200  # admitted before the outage: served, its settlement spooled
    assert answer.headers["x-request-id"] == "req-during-outage"
    booked_as = answer.headers["x-gateway-request-id"]  # the ledger and audit key: the gateway's own id
    assert wait_until(lambda: _all_503(base))
    unknown = httpx.post(f"{base}/v1/chat/completions", json=BODY, headers={"authorization": "Bearer gw-unknown"})
    assert unknown.status_code == 503  # the key cannot be checked: not a 401
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 503 and any("postgresql" in p for p in ready.json()["problems"])
    spooled = wait_until(lambda: booked_as.encode() in b"".join(
        p.read_bytes() for p in (tmp / "spool").glob("*.jsonl")))
    assert spooled
    pg.restore()
    assert wait_until(lambda: _all_ok(base), timeout=30)
    rows = wait_until(lambda: c.query("SELECT attempt, status FROM ledger_entries WHERE request_id = %s",
                                      booked_as))
    assert rows == [(1, "ok")]  # replayed once
    audit = wait_until(lambda: c.query("SELECT count(*) FROM audit_records WHERE request_id = %s",
                                       booked_as)[0][0])
    assert audit == 1
    assert c.query("SELECT count(*) FROM ledger_entries")[0][0] > before
    assert wait_until(lambda: all(p.read_bytes() == b"" for p in (tmp / "spool").glob("*.jsonl")))
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
