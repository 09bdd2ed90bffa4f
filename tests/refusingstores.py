"""Stores that are up but refuse writes, for fail-closed tests, without touching the shared
services other tests use (tests/services.py):

- ``private_redis()``: a redis-server of its own on a free loopback port, which a test can
  put out of memory (``maxmemory`` 1 byte: every write answers ``-OOM``) or make a replica
  of a master that does not exist (every write answers ``-READONLY``), then heal.
- ``pg_database()``: a PostgreSQL database of its own on the test server, which a test can
  make read-only like a hot standby (writes fail with SQLSTATE 25006) and then writable
  again; connections already open are ended, as a failover would.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from tests.harness import free_port
from tests.services import PG_URL, require


class PrivateRedis:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = proc
        self.client = redis.Redis(host="127.0.0.1", port=port)

    def refuse(self, mode: str) -> None:
        """``oom``: every write is refused for memory; ``readonly``: it becomes a replica."""
        if mode == "oom":
            self.client.config_set("maxmemory-policy", "noeviction")
            self.client.config_set("maxmemory", "1")
        else:
            self.client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))

    def accept(self) -> None:
        self.client.config_set("maxmemory", "0")
        self.client.execute_command("REPLICAOF", "NO", "ONE")


@contextmanager
def private_redis(tmp: Path) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed: cannot run a private Redis"
        if os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = PrivateRedis(port, proc)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                server.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.05)
        yield server
    finally:
        server.client.close()
        proc.terminate()
        proc.wait(10)


class PgDatabase:
    def __init__(self, admin_url: str, name: str) -> None:
        self.admin_url = admin_url
        self.name = name
        self.url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))

    def _admin(self, *statements: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)

    def _flip(self, read_only: bool) -> None:
        setting = "SET default_transaction_read_only = on" if read_only else "RESET default_transaction_read_only"
        self._admin(f"ALTER DATABASE {self.name} {setting}",
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}'"
                    " AND pid <> pg_backend_pid()")

    def refuse(self) -> None:
        """Read-only from now on, for every session (open ones are ended, as in a failover)."""
        self._flip(True)

    def accept(self) -> None:
        self._flip(False)


@contextmanager
def pg_database() -> Iterator[PgDatabase]:
    """A fresh database on the test server; dropped afterwards."""
    base = require(PG_URL)
    db = PgDatabase(base, "gwt_" + secrets.token_hex(6))
    db._admin(f"CREATE DATABASE {db.name}")
    try:
        yield db
    finally:
        db._admin(f"DROP DATABASE {db.name} WITH (FORCE)")
