"""The real PostgreSQL and Redis on this machine, for tests (see CONTRACT section 1).

Each test gets its own PostgreSQL schema and Redis key prefix, so tests (and engineers)
sharing the services never see each other's state. Unreachable service: the test is
skipped with the reason, or fails when GATEWAY_REQUIRE_SERVICES=1 (CI).
"""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from urllib.parse import quote, urlsplit

import psycopg
import pytest
import redis

PG_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@cache
def _unreachable(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def require(url: str) -> str:
    """``url`` if its service answers, else skip (or fail under GATEWAY_REQUIRE_SERVICES=1)."""
    reason = _unreachable(url)
    if reason is not None:
        message = f"service at {url} unreachable ({reason})"
        if os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message + " and GATEWAY_REQUIRE_SERVICES=1")
        pytest.skip(message + "; set GATEWAY_TEST_POSTGRES_URL / GATEWAY_TEST_REDIS_URL")
    return url


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema; yields a URL whose connections use it. Dropped afterwards."""
    base = require(PG_URL)
    schema = "gwt_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the test Redis; its keys are deleted afterwards."""
    url = require(REDIS_URL)
    prefix = "gwt-" + secrets.token_hex(6)
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            keys += list(client.scan_iter(match=f"LIMITS:{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
