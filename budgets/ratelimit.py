"""Per-key request and token rate limits on the ``limits`` package (fixed 1-minute windows).

Storage is pluggable by URI: ``memory://`` (default, this process only) or any storage
``limits`` supports, e.g. ``redis://host:6379/0`` to share limits between replicas.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

__all__ = ["RateLimiter", "RateLimits", "RateState"]

_REQUESTS = "gw-requests"
_TOKENS = "gw-tokens"
_WINDOW_S = 60.0
_MAX_CACHED_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Caps per fixed minute; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def _duration(seconds: float) -> str:
    return f"{max(0, math.ceil(seconds))}s"


@dataclass(frozen=True, slots=True)
class RateState:
    """The outcome of one ``RateLimiter.hit``; ``*_tokens``/``*_requests`` are None when
    that limit is not configured. ``retry_after_s`` is set only when not allowed."""

    allowed: bool
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float | None
    retry_after_s: int | None

    def headers(self) -> dict[str, str]:
        """OpenAI-style ``x-ratelimit-*`` headers for the configured limits (resets as "12s")."""
        headers: dict[str, str] = {}
        for kind, limit, remaining, reset in (
            (
                "requests",
                self.limit_requests,
                self.remaining_requests,
                self.reset_requests_s,
            ),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s),
        ):
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining or 0)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset or 0.0)
        return headers


_UNLIMITED = RateState(True, None, None, None, None, None, None, None)


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


def _async_storage(uri: str) -> Storage:
    if not uri.startswith("async+"):
        uri = "async+" + uri
    storage = storage_from_string(uri)
    if not isinstance(
        storage, Storage
    ):  # pragma: no cover - guarded by the "async+" prefix
        raise TypeError(f"not an async rate-limit storage: {type(storage).__name__}")
    return storage


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits, both enforced on each ``hit``.

    A rejected hit consumes nothing. With shared storage (Redis) two replicas can race
    between the check and the increment; the loser is then rejected and its increment
    taken back where the storage supports decrements, so limits are never overshot by
    more than that race allows.
    """

    def __init__(self, storage_uri: str = "memory://") -> None:
        self._storage = _async_storage(storage_uri)
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
        # the storage key twice per call.
        storage_key = self._storage_key(item, key)
        used = await self._storage.get(storage_key)
        reset_at = await self._storage.get_expiry(storage_key)
        # No live window yet: the hit we are about to make starts a full one.
        reset_s = reset_at - now if reset_at > now else _WINDOW_S
        return _Probe(item, cost, max(0, item.amount - used), reset_s)

    async def hit(self, key: str, limits: RateLimits, tokens: int) -> RateState:
        """Count one request of ``tokens`` (estimated) tokens for ``key``, if both fit."""
        if tokens < 0:
            raise ValueError("tokens must be non-negative")
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm is None and tpm is None:
            return _UNLIMITED
        now = time.time()
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
        return _state(allowed, requests, token_probe)

    async def _consume(self, key: str, probes: list[_Probe]) -> bool:
        taken: list[_Probe] = []
        for probe in probes:
            if probe.cost == 0:
                continue
            taken.append(probe)
            if not await self._limiter.hit(probe.item, key, cost=probe.cost):
                # Lost a race on shared storage since the probe: undo and reject.
                for undo in taken:
                    await self._refund(undo.item, key, undo.cost)
                probe.remaining = 0
                return False
        return True

    async def _refund(self, item: RateLimitItem, key: str, amount: int) -> None:
        decr = getattr(self._storage, "decr", None)
        if decr is not None:
            await decr(self._storage_key(item, key), amount)

    async def adjust_tokens(self, key: str, limits: RateLimits, delta: int) -> None:
        """Correct the token count once actual usage is known (``delta`` = actual - estimate).

        A positive delta is consumed even past the limit (the tokens were already used).
        A negative delta is refunded where the storage can decrement (memory, memcached);
        on storages that cannot (the async Redis storages), it is ignored and the estimate
        stands until the window resets.
        """
        tpm = limits.tokens_per_minute
        if tpm is None or delta == 0:
            return
        item = self._item(_TOKENS, tpm)
        if delta > 0:
            await self._limiter.hit(item, key, cost=delta)
        else:
            await self._refund(item, key, -delta)

    async def close(self) -> None:
        # The in-memory storage keeps an expiry task; stop it with the limiter.
        timer = getattr(self._storage, "timer", None)
        if isinstance(timer, asyncio.Task) and not timer.done():
            timer.cancel()


def _state(allowed: bool, requests: _Probe | None, tokens: _Probe | None) -> RateState:
    def remaining(probe: _Probe) -> int:
        left = probe.remaining - probe.cost if allowed else probe.remaining
        return max(0, left)

    retry_after: int | None = None
    if not allowed:
        blocking = [
            p.reset_s for p in (requests, tokens) if p is not None and not p.fits
        ]
        retry_after = max(1, math.ceil(max(blocking, default=_WINDOW_S)))
    return RateState(
        allowed=allowed,
        limit_requests=None if requests is None else requests.item.amount,
        remaining_requests=None if requests is None else remaining(requests),
        reset_requests_s=None if requests is None else requests.reset_s,
        limit_tokens=None if tokens is None else tokens.item.amount,
        remaining_tokens=None if tokens is None else remaining(tokens),
        reset_tokens_s=None if tokens is None else tokens.reset_s,
        retry_after_s=retry_after,
    )
