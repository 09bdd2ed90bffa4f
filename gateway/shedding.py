"""Overload shedding: a per-replica cap on requests in progress, and on requests waiting.

A request holds one slot from admission until it is settled (for a stream: its last byte).
Past `max_active` it waits in a FIFO queue of at most `max_queued`, for at most
`queue_timeout_s`; past that it is refused at once: 503 (OpenAI format) or 529
`overloaded_error` (Anthropic format), with `retry-after`. Refusing costs a counter
compare, so an overloaded replica stays responsive (and `/healthz` never waits here).

The common path is synchronous (`try_acquire`: two compares and an add); only a request
that has to queue awaits a future. Releasing hands the slot straight to the oldest waiter.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from gateway.errors import ApiFormat, GatewayError

RETRY_AFTER_S = "1"


class Overloaded(GatewayError):
    status, code, type = 503, "overloaded", "server_error"

    def __init__(self, api: ApiFormat) -> None:
        super().__init__("the gateway is at capacity; retry shortly", headers={"retry-after": RETRY_AFTER_S})
        if api == "anthropic":
            self.status = 529  # rendered as Anthropic's overloaded_error


class Shedder:
    def __init__(self, max_active: int, max_queued: int, queue_timeout_s: float, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._shed = Counter("gateway_shed_requests", "Requests refused because the replica is at capacity",
                             ["reason"], registry=registry) if registry is not None else None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """A slot now, if one is free and nobody is queued ahead (the common path)."""
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self, api: ApiFormat) -> None:
        """A slot, waiting in line when all are taken; Overloaded when the line is full or too slow."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queued:
            self._count("queue_full")
            raise Overloaded(api)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived as the wait ran out: keep it
            self._forget(waiter)
            self._count("queue_timeout")
            raise Overloaded(api) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: `active` is unchanged
                return
        self.active -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _count(self, reason: str) -> None:
        if self._shed is not None:
            self._shed.labels(reason).inc()


class LoadCollector:
    """Scrape-time gauges for capacity and leaks: slots in use, queue, event-loop tasks, open
    file descriptors and upstream connections (what bench/soak.py watches)."""

    def __init__(self, shedder: Shedder, upstream_connections: Callable[[], int]) -> None:
        self._shedder = shedder
        self._connections = upstream_connections

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        out = []
        for name, doc, value in (
            ("gateway_active_requests", "Requests holding a capacity slot", self._shedder.active),
            ("gateway_queued_requests", "Requests waiting for a capacity slot", self._shedder.queued),
            ("gateway_event_loop_tasks", "asyncio tasks alive in the serving loop", _task_count()),
            ("gateway_open_fds", "Open file descriptors of this process", _fd_count()),
            ("gateway_upstream_connections", "Upstream connections, busy or pooled", self._connections()),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            out.append(family)
        return out


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the loop
        return -1


def _fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
