"""Per-key request and token rate limits on the ``limits`` package (fixed 1-minute windows).

Storage is pluggable by URI: ``memory://`` (default, this process only) or
``redis://host:6379/0`` to share limits between replicas (``limits``' async Redis storage
on the redis-py client). Every counter update is one atomic INCRBY in the store, so the
replicas together admit exactly the limit. A store that cannot be reached raises
``StoreUnavailable``: callers fail closed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from budgets._memory import InlineExpiryMemoryStorage
from budgets._ratestate import UNLIMITED, WINDOW_S, RateLimits, RateState, reset_seconds
from budgets.ledger import StoreUnavailable

__all__ = ["RateLimiter", "RateLimits", "RateState"]

T = TypeVar("T")
_REQUESTS = "gw-requests"
# Take back ``amount`` from a live window, never below 0, never creating a key; skipped
# when the live window ends later than the one the tokens were counted in (ARGV[3], ms,
# on the caller's clock; ARGV[2] is the caller's now, so no clock is compared across hosts).
_REFUND = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then return 0 end
if tonumber(ARGV[3]) > 0 and tonumber(ARGV[2]) + ttl > tonumber(ARGV[3]) + 1000 then return 0 end
local left = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[1])
if left < 0 then left = 0 end
redis.call('SET', KEYS[1], left, 'KEEPTTL')
return left
"""
_TOKENS = "gw-tokens"
_MAX_CACHED_KEYS = 100_000


@dataclass(slots=True)
class _Probe:
    """One configured limit during a ``hit``: its window before, and the cost asked for."""

    item: RateLimitItem
    cost: int
    remaining: int
    reset_s: float

    @property
    def fits(self) -> bool:
        return self.cost <= self.remaining


def _async_storage(uri: str, key_prefix: str, timeout_s: float) -> Storage:
    options: dict[str, Any] = {}
    if uri.startswith(("redis://", "rediss://", "async+redis://", "async+rediss://")):
        options = {
            "implementation": "redispy", "key_prefix": key_prefix, "wrap_exceptions": True,
            "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }  # fmt: skip
    if not uri.startswith("async+"):
        uri = "async+" + uri
    storage = storage_from_string(uri, **options)
    if not isinstance(
        storage, Storage
    ):  # pragma: no cover - guarded by the "async+" prefix
        raise TypeError(f"not an async rate-limit storage: {type(storage).__name__}")
    return storage


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits, both enforced on each ``hit``.

    A rejected hit consumes nothing. With shared storage (Redis) two replicas can race
    between the probe and the increment; the increment itself is atomic and admits only
    while the count stays within the limit, and the loser's increment is taken back.
    """

    def __init__(
        self, storage_uri: str = "memory://", *, key_prefix: str = "LIMITS", timeout_s: float = 2.0
    ) -> None:
        self.shared = not storage_uri.startswith(("memory://", "async+memory://"))
        # In this process only: ``limits``' synchronous storage, no awaits. The event loop
        # runs one hit at a time, so probe-then-consume cannot interleave with another hit.
        self._memory: MemoryStorage | None = None
        if not self.shared:
            self._memory = InlineExpiryMemoryStorage()
            storage_uri = "async+memory://"  # the async storage below stays unused
        self._storage = _async_storage(storage_uri, key_prefix, timeout_s)
        bridge = getattr(self._storage, "bridge", None)
        self._redis_refund = (
            None if bridge is None else bridge.get_connection().register_script(_REFUND)
        )
        self._limiter = FixedWindowRateLimiter(self._storage)
        # Parsed once per distinct (kind, amount); keys are per (namespace, amount).
        self._items: dict[tuple[str, int], RateLimitItem] = {}
        self._storage_keys: dict[tuple[str, int, str], str] = {}

    def _item(self, kind: str, amount: int) -> RateLimitItem:
        item = self._items.get((kind, amount))
        if item is None:
            if amount < 1:
                raise ValueError(
                    f"rate limit must be at least 1 per minute, got {amount}"
                )
            item = self._items[(kind, amount)] = RateLimitItemPerMinute(
                amount, namespace=kind
            )
        return item

    def _storage_key(self, item: RateLimitItem, key: str) -> str:
        cache_key = (item.namespace, item.amount, key)
        storage_key = self._storage_keys.get(cache_key)
        if storage_key is None:
            if len(self._storage_keys) >= _MAX_CACHED_KEYS:
                self._storage_keys.clear()
            storage_key = self._storage_keys[cache_key] = item.key_for(key)
        return storage_key

    async def _probe(
        self, item: RateLimitItem, key: str, cost: int, now: float
    ) -> _Probe:
        # Reads what FixedWindowRateLimiter.get_window_stats reads, without rebuilding
        # the storage key twice per call; on Redis in one round trip, with millisecond TTL.
        storage_key = self._storage_key(item, key)
        if self._redis_refund is not None:
            bridge = self._storage.bridge  # type: ignore[attr-defined]
            pipe = bridge.get_connection().pipeline(transaction=False)
            pipe.get(bridge.prefixed_key(storage_key))
            pipe.pttl(bridge.prefixed_key(storage_key))
            value, ttl_ms = await _guard(pipe.execute())
            used, reset_at = int(value or 0), now + max(ttl_ms, 0) / 1000
        else:  # in memory: plain awaits are cheaper than a gather
            used = await self._storage.get(storage_key)
            reset_at = await self._storage.get_expiry(storage_key)
        # No live window yet: the hit we are about to make starts a full one.
        reset_s = min(reset_at - now, WINDOW_S) if reset_at > now else WINDOW_S
        return _Probe(item, cost, max(0, item.amount - used), reset_s)

    async def hit(self, key: str, limits: RateLimits, tokens: int) -> RateState:
        """Count one request of ``tokens`` (estimated) tokens for ``key``, if both fit."""
        if tokens < 0:
            raise ValueError("tokens must be non-negative")
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm is None and tpm is None:
            return UNLIMITED
        now = time.time()
        if self._memory is not None:
            return self._hit_memory(key, rpm, tpm, tokens, now)
        requests = (
            None
            if rpm is None
            else await self._probe(self._item(_REQUESTS, rpm), key, 1, now)
        )
        token_probe = (
            None
            if tpm is None
            else await self._probe(self._item(_TOKENS, tpm), key, tokens, now)
        )
        probes = [p for p in (requests, token_probe) if p is not None]
        allowed = all(p.fits for p in probes) and await self._consume(key, probes)
        return _state(allowed, requests, token_probe, now)

    def _hit_memory(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, now: float
    ) -> RateState:
        """``hit`` on the in-process storage: read both windows, then count in both only if both
        fit (no await in between, so nothing interleaves). Straight-line on purpose: it runs
        on every request."""
        memory = self._memory
        assert memory is not None
        req_key = tok_key = ""
        used_req = used_tok = 0
        reset_req = reset_tok = WINDOW_S
        allowed = True
        if rpm is not None:
            req_item, req_key, used_req, reset_req = self._window_memory(_REQUESTS, rpm, key, now)
            allowed = 1 <= max(0, rpm - used_req)
        if tpm is not None:
            tok_item, tok_key, used_tok, reset_tok = self._window_memory(_TOKENS, tpm, key, now)
            allowed = allowed and tokens <= max(0, tpm - used_tok)
        retry_after: int | None = None
        if allowed:
            if rpm is not None:
                used_req = memory.incr(req_key, req_item.get_expiry(), amount=1)
            if tpm is not None and tokens:
                used_tok = memory.incr(tok_key, tok_item.get_expiry(), amount=tokens)
        else:
            blocking = [reset for limit, used, cost, reset in ((rpm, used_req, 1, reset_req),
                                                                (tpm, used_tok, tokens, reset_tok))
                        if limit is not None and cost > max(0, limit - used)]
            retry_after = max(1, math.ceil(max(blocking, default=WINDOW_S)))
        return RateState(
            allowed=allowed,
            limit_requests=rpm,
            remaining_requests=None if rpm is None else max(0, rpm - used_req),
            reset_requests_s=None if rpm is None else reset_req,
            limit_tokens=tpm,
            remaining_tokens=None if tpm is None else max(0, tpm - used_tok),
            reset_tokens_s=None if tpm is None else reset_tok,
            retry_after_s=retry_after,
            tokens_window_end=None if tpm is None else now + reset_tok,
        )

    def _window_memory(self, kind: str, amount: int, key: str, now: float) -> tuple[RateLimitItem, str, int, float]:
        """(item, storage key, count so far, seconds to its reset) of one in-memory window."""
        memory = self._memory
        assert memory is not None
        item = self._item(kind, amount)
        storage_key = self._storage_key(item, key)
        used = memory.get(storage_key)
        return item, storage_key, used, reset_seconds(memory.get_expiry(storage_key), now) if used else WINDOW_S

    def _hit_window(self, item: RateLimitItem, key: str, cost: int) -> bool:
        # What the sync FixedWindowRateLimiter.hit does, on the cached storage key.
        memory = self._memory
        assert memory is not None
        return memory.incr(self._storage_key(item, key), item.get_expiry(), amount=cost) <= item.amount

    def _refund_memory(
        self, item: RateLimitItem, key: str, amount: int, window_end: float | None
    ) -> None:
        memory = self._memory
        assert memory is not None
        storage_key = self._storage_key(item, key)
        if window_end is not None and memory.get_expiry(storage_key) > window_end + 1:
            return  # the window the tokens were counted in is over
        memory.decr(storage_key, amount)

    async def _consume(self, key: str, probes: list[_Probe]) -> bool:
        taken: list[_Probe] = []
        for probe in probes:
            if probe.cost == 0:
                continue
            taken.append(probe)
            if not await _guard(self._limiter.hit(probe.item, key, cost=probe.cost)):
                # Lost a race on shared storage since the probe: undo and reject.
                for undo in taken:
                    await self._refund(undo.item, key, undo.cost)
                probe.remaining = 0
                return False
        return True

    async def _refund(
        self, item: RateLimitItem, key: str, amount: int, window_end: float | None = None
    ) -> None:
        storage_key = self._storage_key(item, key)
        if self._redis_refund is not None:
            bridge = self._storage.bridge  # type: ignore[attr-defined]
            end_ms = 0 if window_end is None else int(window_end * 1000)
            args = [amount, int(time.time() * 1000), end_ms]
            await _guard(self._redis_refund(keys=[bridge.prefixed_key(storage_key)], args=args))
            return
        decr = getattr(self._storage, "decr", None)
        if decr is None:
            return
        if window_end is not None and await self._storage.get_expiry(storage_key) > window_end + 1:
            return  # the window the tokens were counted in is over
        await decr(storage_key, amount)

    async def adjust_tokens(
        self, key: str, limits: RateLimits, delta: int, *, window_end: float | None = None
    ) -> None:
        """Correct the token count once actual usage is known (``delta`` = actual - estimate).

        A positive delta is consumed even past the limit (the tokens were already used).
        A negative delta is given back to the window the estimate was counted in
        (``RateState.tokens_window_end``), only while that window is still the current one.
        """
        tpm = limits.tokens_per_minute
        if tpm is None or delta == 0:
            return
        item = self._item(_TOKENS, tpm)
        if self._memory is not None:
            if delta > 0:
                self._hit_window(item, key, delta)
            else:
                self._refund_memory(item, key, -delta, window_end)
            return
        if delta > 0:
            await _guard(self._limiter.hit(item, key, cost=delta))
        else:
            await self._refund(item, key, -delta, window_end)

    async def check(self) -> None:
        """Raise ``StoreUnavailable`` if a shared storage does not answer."""
        if self.shared and not await _guard(self._storage.check()):
            raise StoreUnavailable("redis", "no answer to PING")

    async def close(self) -> None:
        bridge = getattr(self._storage, "bridge", None)
        if bridge is not None:
            await bridge.get_connection().aclose()
        # The in-memory storage keeps an expiry task; stop it with the limiter.
        timer = getattr(self._storage, "timer", None)
        if isinstance(timer, asyncio.Task) and not timer.done():
            timer.cancel()
        if self._memory is not None:
            self._memory.timer.cancel()  # its expiry thread


async def _guard(work: Awaitable[T]) -> T:
    try:
        return await work
    except StorageError as exc:
        raise StoreUnavailable("redis", type(exc.storage_error).__name__) from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # our own calls on the bridge
        raise StoreUnavailable("redis", type(exc).__name__) from exc


def _state(allowed: bool, requests: _Probe | None, tokens: _Probe | None, now: float) -> RateState:
    def remaining(probe: _Probe) -> int:
        left = probe.remaining - probe.cost if allowed else probe.remaining
        return max(0, left)

    retry_after: int | None = None
    if not allowed:
        blocking = [
            p.reset_s for p in (requests, tokens) if p is not None and not p.fits
        ]
        retry_after = max(1, math.ceil(max(blocking, default=WINDOW_S)))
    return RateState(
        allowed=allowed,
        limit_requests=None if requests is None else requests.item.amount,
        remaining_requests=None if requests is None else remaining(requests),
        reset_requests_s=None if requests is None else requests.reset_s,
        limit_tokens=None if tokens is None else tokens.item.amount,
        remaining_tokens=None if tokens is None else remaining(tokens),
        reset_tokens_s=None if tokens is None else tokens.reset_s,
        retry_after_s=retry_after,
        tokens_window_end=None if tokens is None else now + tokens.reset_s,
    )
