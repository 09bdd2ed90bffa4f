"""Tenant API keys: config hashes plus keys created at run time (only their SHA-256 stored)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from budgets import StoreUnavailable
from gateway.config import TenantConfig
from gateway.db import connect

log = logging.getLogger("gateway.keys")
_NEGATIVE_TTL_S = 2.0
_NEGATIVE_MAX = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    key_sha256: str
    name: str = ""
    created_at: str = ""
    expires_at: str | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None
    source: str = "db"

    def usable(self, now: datetime) -> bool:
        if self.revoked_at:
            return False
        return not (self.expires_at and datetime.fromisoformat(self.expires_at) <= now)

    def public(self) -> dict[str, str | None]:
        """What listing shows: never the key, never its hash."""
        return {
            "id": self.id, "tenant": self.tenant, "name": self.name, "created_at": self.created_at,
            "expires_at": self.expires_at, "last_used_at": self.last_used_at, "revoked_at": self.revoked_at,
            "source": self.source,
        }


def _row(row: tuple[str, ...]) -> KeyRecord:
    return KeyRecord(*row)


_COLUMNS = "id, tenant, key_sha256, name, created_at, expires_at, last_used_at, revoked_at"


class KeyAdmin:
    """Synchronous key management on the state database (CLI and admin API)."""

    def __init__(self, db_path: Path | str) -> None:  # a SQLite file or a postgresql:// URL
        self._db_path = db_path

    def _conn(self) -> sqlite3.Connection:
        return connect(self._db_path)

    def create(self, tenant: str, name: str = "", expires_in_days: int | None = None) -> tuple[str, KeyRecord]:
        key = "gw-" + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        record = KeyRecord(
            id="key_" + secrets.token_hex(6), tenant=tenant, key_sha256=hash_key(key), name=name,
            created_at=now.isoformat(timespec="seconds"),
            expires_at=(now + timedelta(days=expires_in_days)).isoformat(timespec="seconds") if expires_in_days else None,
        )
        with self._conn() as conn:
            conn.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (record.id, record.tenant, record.key_sha256, record.name, record.created_at,
                 record.expires_at, None, None),
            )
        return key, record

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        with self._conn() as conn:
            if tenant:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE tenant=? ORDER BY created_at", (tenant,))
            else:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY tenant, created_at")
            return [_row(r) for r in rows.fetchall()]

    def revoke(self, key_id: str) -> bool:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._conn() as conn:
            cur = conn.execute("UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (now, key_id))
            return cur.rowcount > 0

    def lookup(self, digest: str) -> KeyRecord | None:
        with self._conn() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_sha256=?", (digest,)).fetchone()
            return _row(row) if row else None

    def all_by_hash(self) -> dict[str, KeyRecord]:
        return {r.key_sha256: r for r in self.list()}

    def touch(self, used: dict[str, str]) -> None:
        with self._conn() as conn:
            conn.executemany("UPDATE api_keys SET last_used_at=? WHERE id=?", [(ts, kid) for kid, ts in used.items()])


class KeyStore:
    """Authentication on the hot path: an in-memory map refreshed in the background.

    A key unknown to the map is looked up in the database once (so a key made a moment
    ago by `gateway keys create` works at once); misses are remembered briefly.
    """

    def __init__(self, admin: KeyAdmin, tenants: list[TenantConfig], refresh_s: float = 2.0) -> None:
        self._admin = admin
        self._refresh_s = refresh_s
        self._static = {
            digest: KeyRecord(id=f"cfg-{digest[:8]}", tenant=t.id, key_sha256=digest, name="config", source="config")
            for t in tenants for digest in t.api_keys_sha256
        }
        self._known: dict[str, KeyRecord] = dict(self._static)
        self._misses: dict[str, float] = {}
        self._used: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="keys-refresh")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._flush_used()

    async def refresh(self) -> None:
        stored = await asyncio.to_thread(self._admin.all_by_hash)
        self._known = {**stored, **self._static}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self._flush_used()
                await self.refresh()
            except (sqlite3.Error, OSError) as exc:
                log.warning("key refresh failed", extra={"error": type(exc).__name__})

    async def _flush_used(self) -> None:
        if self._used:
            used, self._used = self._used, {}
            await asyncio.to_thread(self._admin.touch, used)

    async def authenticate(self, presented: str, now: datetime) -> KeyRecord | None:
        digest = hash_key(presented)
        record = self._known.get(digest)
        if record is None:
            record = await self._lookup_miss(digest)
        if record is None or not hmac.compare_digest(record.key_sha256, digest) or not record.usable(now):
            return None
        if record.source == "db":
            self._used[record.id] = now.isoformat(timespec="seconds")
        return record

    async def _lookup_miss(self, digest: str) -> KeyRecord | None:
        seen = self._misses.get(digest)
        mono = time.monotonic()
        if seen is not None and mono - seen < _NEGATIVE_TTL_S:
            return None
        try:
            record = await asyncio.to_thread(self._admin.lookup, digest)
        except sqlite3.Error as exc:
            # Cannot tell whether the key is valid: fail closed with 503, never 401.
            raise StoreUnavailable("database", type(exc).__name__) from exc
        if record is None:
            if len(self._misses) >= _NEGATIVE_MAX:
                self._misses.clear()
            self._misses[digest] = mono
            return None
        self._known[digest] = record
        return record

    def revoked_locally(self, key_id: str) -> None:
        """Drop a key from the map at once (admin API revocation on this replica)."""
        self._known = {d: r for d, r in self._known.items() if r.id != key_id}
