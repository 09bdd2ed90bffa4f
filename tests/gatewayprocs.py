"""Real `python -m gateway serve` processes for multi-replica tests, sharing the test's
PostgreSQL schema and Redis key prefix (tests/services.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.harness import ADMIN_KEY, ROOT, base_config, free_port, write_config
from tests.services import REDIS_URL, pg_schema, redis_prefix


class GatewayProcess:
    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {
            **os.environ, "TEST_UPSTREAM_KEY": "sk-upstream-secret-test", "TEST_GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "GATEWAY_FLUSH_INTERVAL_S": "0.02", "GATEWAY_KEYS_REFRESH_S": "0.5", "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--host", "127.0.0.1",
             "--port", str(self.port), *(args or [])],
            cwd=ROOT, env=environment, stdout=self._log, stderr=self._log, start_new_session=True,
        )
        self._wait_ready()

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def replica_config(upstream_url: str, tmp: Path, pg_url: str, redis_url: str | None, prefix: str) -> dict[str, Any]:
    """The harness config with shared state: PostgreSQL rows and audit, Redis reservations and limits."""
    config = base_config(upstream_url, tmp)
    config["state"] = {"database_url": pg_url, "redis_url": redis_url, "redis_key_prefix": prefix,
                       "spool_dir": str(tmp / "spool")}
    config["audit"]["jsonl_path"] = str(tmp / "audit.jsonl")
    return config


class Cluster:
    """N gateway processes on one config; ``pg`` queries the shared schema."""

    def __init__(self, stack: ExitStack, tmp: Path, config: dict[str, Any], n: int,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.config_path = write_config(tmp, config)
        self.pg_url = config["state"]["database_url"]
        self.nodes: list[GatewayProcess] = []
        stack.callback(self.stop)
        for i in range(n):
            self.start_node(i, env)

    def start_node(self, i: int, env: dict[str, str] | None = None) -> GatewayProcess:
        node = GatewayProcess(self.config_path, self.tmp / f"gateway-{i}.log", env)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


@contextmanager
def cluster(upstream_url: str, tmp: Path, n: int, *, redis: bool = True, edit: Any = None,
            env: dict[str, str] | None = None) -> Iterator[Cluster]:
    with ExitStack() as stack:
        pg_url = stack.enter_context(pg_schema())
        prefix = stack.enter_context(redis_prefix())
        config = replica_config(upstream_url, tmp, pg_url, REDIS_URL if redis else None, prefix)
        if edit is not None:
            edit(config)
        yield Cluster(stack, tmp, config, n, env)
