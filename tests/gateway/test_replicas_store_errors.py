"""Store failures other than a cut connection fail closed too (issue 5, guarantee 6): Redis
answering OOM or READONLY, PostgreSQL turned read-only (a standby after a failover), and a
PostgreSQL that hangs. Requests get 503 with retry-after, /readyz reports the store,
settlements are spooled and replayed, and the gateway recovers without a restart."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.harness import TENANT_KEY, RunningGateway, UpstreamProcess
from tests.refusingstores import pg_database, private_redis
from tests.services import pg_schema
from tests.tcpproxy import proxy_for

BODY = {"model": "mock-a", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
OPENAI = {"authorization": f"Bearer {TENANT_KEY}"}


def _post(gw: RunningGateway, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.v1}/chat/completions", json=BODY, headers={**OPENAI, **headers}, timeout=30)


def _until(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _fails_closed(answer: httpx.Response) -> None:
    assert answer.status_code == 503  # never a 500, never admitted unmetered
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.json()["error"]["code"] == "service_unavailable"


def _degraded(gw: RunningGateway, store: str) -> bool:
    ready = httpx.get(f"{gw.url}/readyz", timeout=20)
    return ready.status_code == 503 and any(store in p for p in ready.json()["problems"])


def _ready(gw: RunningGateway) -> bool:
    return httpx.get(f"{gw.url}/readyz", timeout=20).status_code == 200


def _budgeted(config: dict[str, Any], tmp: Path, **state: Any) -> None:
    config["tenants"][0].update(budgets=[{"window": "day", "max_usd": 10}], rate_limits={})
    config["state"] = {**config["state"], "spool_dir": str(tmp / "spool"), **state}


@pytest.mark.parametrize("mode", ["oom", "readonly"])
def test_redis_refusing_writes_fails_closed_and_recovers(
        mode: str, tmp_path: Path, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    with private_redis(tmp_path) as redis:
        _budgeted(gw_config, tmp_path, redis_url=redis.url)
        gw = start_gateway()
        assert _post(gw).status_code == 200
        redis.refuse(mode)
        _fails_closed(_post(gw))
        assert _until(lambda: _degraded(gw, "redis"))
        redis.accept()
        assert _until(lambda: _post(gw).status_code == 200)  # no restart
        assert _until(lambda: _ready(gw))


def _spooled(tmp: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (tmp / "spool").glob("*.jsonl"))


def test_postgres_turned_read_only_fails_closed_spools_and_recovers(
        tmp_path: Path, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway],
        upstream: UpstreamProcess) -> None:
    with pg_database() as db:
        _budgeted(gw_config, tmp_path, database_url=db.url)
        gw = start_gateway()
        assert _post(gw).status_code == 200
        upstream.script({"delay_ms": 1500})

        async def settled_while_read_only() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as http:
                task = asyncio.create_task(http.post(f"{gw.v1}/chat/completions", json=BODY, headers=OPENAI))
                await asyncio.sleep(0.5)
                await asyncio.to_thread(db.refuse)  # a failover to a read-only standby, mid-request
                return await task

        answer = asyncio.run(settled_while_read_only())
        assert answer.status_code == 200  # admitted before: served, its settlement kept
        booked_as = answer.headers["x-gateway-request-id"]
        assert _until(lambda: booked_as.encode() in _spooled(tmp_path))
        _fails_closed(_post(gw))
        assert _until(lambda: _degraded(gw, "postgresql"))
        db.accept()
        assert _until(lambda: _post(gw).status_code == 200)
        with psycopg.connect(db.url) as conn:
            rows = _until(lambda: conn.execute("SELECT attempt, status FROM ledger_entries WHERE request_id = %s",
                                               (booked_as,)).fetchall())
        assert rows == [(1, "ok")]  # replayed once
        assert _until(lambda: _spooled(tmp_path) == b"")
        assert _until(lambda: _ready(gw))


def test_a_hung_postgres_fails_closed_within_the_store_timeout(
        tmp_path: Path, gw_config: dict[str, Any], start_gateway: Callable[..., RunningGateway]) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(pg_schema())
        pg = stack.enter_context(proxy_for(url))
        _budgeted(gw_config, tmp_path, database_url=pg.url_for(url))
        gw = start_gateway(store_timeout_s=1.0)
        assert _post(gw).status_code == 200
        pg.stall()  # accepts connections, never answers
        started = time.monotonic()
        _fails_closed(_post(gw))
        assert time.monotonic() - started < 4.0  # about one store timeout, not forever
        assert _until(lambda: _degraded(gw, "postgresql"))
        pg.restore()
        assert _until(lambda: _post(gw).status_code == 200)
