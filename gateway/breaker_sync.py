"""Circuit breaker state shared by replicas through Redis (when `state.redis_url` is set).

Each replica decides locally, on its own hot path, with no round trip. Every `interval_s`
one background task pushes this replica's state changes (open with its deadline, closed)
to one Redis hash and reads everyone's: a model another replica opened is opened here until
the same wall-clock deadline, and a close after a successful probe elsewhere closes it here.
A write only lands when it is newer than what the hash holds (Lua), so replicas converge on
the latest change. Redis being down only means breakers are per replica again meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from budgets import redis_client
from gateway.breaker import Breakers

log = logging.getLogger("gateway.breaker")

_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and decoded['changed_wall'] and tonumber(decoded['changed_wall']) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], 86400)
return 1
"""


class BreakerSync:
    def __init__(self, breakers: Breakers, redis_url: str, prefix: str, *, interval_s: float = 0.5,
                 timeout_s: float = 2.0) -> None:
        self._breakers = breakers
        self._url = redis_url
        self._key = f"{prefix}:breakers"
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._client: Any = None
        self._script: Any = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        self._client = redis_client(self._url, max_connections=2, timeout_s=self._timeout_s)
        self._script = self._client.register_script(_SET_IF_NEWER)
        self._task = asyncio.create_task(self._loop(), name="breaker-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.sync_once()  # the last changes of a draining replica still count
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def sync_once(self) -> None:
        outbox, self._breakers.outbox = self._breakers.outbox, {}
        try:
            for name, entry in outbox.items():
                await self._script(keys=[self._key], args=[name, orjson.dumps(entry), entry["changed_wall"]])
            shared = await self._client.hgetall(self._key)
        except BaseException:
            for name, entry in outbox.items():  # not shared yet: try again next round, unless superseded
                self._breakers.outbox.setdefault(name, entry)
            raise
        for name, raw in shared.items():
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                self._breakers.adopt(name.decode() if isinstance(name, bytes) else str(name), entry)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
                if self._failing:
                    log.info("breaker state sharing restored")
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - Redis down: breakers stay per replica meanwhile
                if not self._failing:
                    log.warning("breaker state sharing failed; breakers are per replica until Redis answers",
                                extra={"error": type(exc).__name__})
                self._failing = True
            await asyncio.sleep(self._interval_s)
