"""Circuit breakers, one per model deployment (a model of the config).

    closed --(N failures in a row, or an error ratio over a window)--> open
    open --(cooldown, doubling on every re-open up to a maximum)--> half-open
    half-open --(one probe succeeds)--> closed;  (the probe fails)--> open, longer cooldown

An open breaker takes its model out of routing: the runtime catalog's `Candidate` gets
`breaker="circuit open: <why>"`, so `choose`, `explain` and the audit's `rejected` show it.
Never every candidate at once: when a request's candidates are all open, the least recently
failed one is tried anyway (`revive` for the routing decision, `least_recently_failed` +
`force` in dispatch). A provider that refuses the gateway's key (401/403) or whose quota is
spent (429 insufficient_quota) gets all its models opened for `key_cooldown_s`, and those
are not revived: nothing else is wrong with the request, so it fails fast with 502.

Hot path: `admit` is a dict lookup and an int compare while closed, `succeeded` a few
attribute updates; nothing allocates. State changes are rare: they publish a new catalog
(never mutated in place), count a metric, and queue the change for `BreakerSync` (Redis).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from gateway.errors import UpstreamFailed
from routing_policies import CIRCUIT_OPEN, Candidate, Decision

log = logging.getLogger("gateway.breaker")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5  # failures in a row that open a breaker
    error_ratio: float = 0.5  # ... or this share of failures over the window
    window_s: float = 30.0
    min_requests: int = 20  # ... once the window holds at least this many attempts
    cooldown_s: float = 5.0  # first open; doubles on every re-open
    max_cooldown_s: float = 300.0
    key_cooldown_s: float = 60.0  # provider refused the key or its quota is spent


class CatalogHolder(Protocol):
    catalog: dict[str, Candidate]


class _Breaker:
    __slots__ = (
        "changed_wall",
        "failed",
        "in_a_row",
        "key_refused",
        "last_failure",
        "name",
        "ok",
        "opens",
        "prev_failed",
        "prev_ok",
        "probing",
        "provider",
        "reason",
        "state",
        "timer",
        "until",
        "win_start",
    )

    def __init__(self, name: str, provider: str) -> None:
        self.name, self.provider = name, provider
        self.state = CLOSED
        self.in_a_row = self.ok = self.failed = self.prev_ok = self.prev_failed = self.opens = 0
        self.win_start = self.until = self.last_failure = 0.0
        self.probing = self.key_refused = False
        self.reason = ""
        self.changed_wall = 0.0
        self.timer: asyncio.TimerHandle | None = None


class Breakers:
    def __init__(self, models: Mapping[str, str], holder: CatalogHolder, settings: BreakerSettings | None = None, *,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """`models`: model name -> provider name."""
        self.settings = settings or BreakerSettings()
        self._holder = holder
        self._clock = clock
        self._by_name = {name: _Breaker(name, provider) for name, provider in models.items()}
        self.open_count = 0  # breakers not closed: the pipeline only looks further when > 0
        self.outbox: dict[str, dict[str, Any]] = {}  # changes for BreakerSync to share
        self._transitions = Counter("gateway_breaker_transitions", "Circuit breaker state changes",
                                    ["model", "state"], registry=registry) if registry is not None else None
        if registry is not None:
            registry.register(_BreakerCollector(self))

    # -- hot path -------------------------------------------------------------------------

    def admit(self, name: str) -> bool:
        """May an attempt go to this model now? Half-open: only the one probe."""
        b = self._by_name.get(name)
        if b is None or b.state == CLOSED:
            return True
        if b.state == OPEN:
            if self._clock() < b.until:
                return False
            self._half_open(b)
        if b.probing:
            return False
        b.probing = True
        return True

    def succeeded(self, name: str) -> None:
        b = self._by_name.get(name)
        if b is None:
            return
        b.in_a_row = 0
        now = self._clock()
        if now - b.win_start >= self.settings.window_s:
            _roll(b, now, self.settings.window_s)
        b.ok += 1
        if b.state == HALF_OPEN or (b.state == OPEN and b.probing):
            self._close(b)

    def failed(self, name: str, *, in_a_row: bool = True) -> None:
        """A failed attempt. `in_a_row=False` (a bare 500, which some local servers also answer to
        malformed requests) counts toward the error ratio only, so a few bad requests cannot
        open a healthy deployment's breaker."""
        b = self._by_name.get(name)
        if b is None:
            return
        now = self._clock()
        if in_a_row:
            b.in_a_row += 1
        b.last_failure = now
        if now - b.win_start >= self.settings.window_s:
            _roll(b, now, self.settings.window_s)
        b.failed += 1
        if b.state == HALF_OPEN or (b.state == OPEN and b.probing):
            self._open(b, "half-open probe failed")
        elif b.state == CLOSED:
            reason = self._trips(b)
            if reason is not None:
                self._open(b, reason)

    def closed(self, name: str) -> bool:
        b = self._by_name.get(name)
        return b is None or b.state == CLOSED

    def released(self, name: str) -> None:
        """An admitted attempt ended without a verdict (cancelled): free the probe slot."""
        b = self._by_name.get(name)
        if b is not None and b.state != CLOSED:
            b.probing = False

    # -- all candidates open ---------------------------------------------------------------

    def force(self, name: str) -> None:
        """Send an attempt to an open model anyway (every candidate is open); its outcome decides."""
        b = self._by_name.get(name)
        if b is not None and b.state != CLOSED:
            b.probing = True

    def least_recently_failed(self, names: Iterable[str]) -> str | None:
        """Of these models, the one whose last failure is oldest (never refused keys)."""
        usable = [self._by_name[n] for n in names if n in self._by_name and not self._by_name[n].key_refused]
        return min(usable, key=lambda b: b.last_failure).name if usable else None

    def revive(self, decision: Decision, choose_with: Callable[[dict[str, Candidate]], Decision]) -> Decision:
        """A decision left without candidates because their breakers are open: decide again
        with the least recently failed of them routable (for this request only)."""
        opened = [r.model for r in decision.rejected if r.reason.startswith(CIRCUIT_OPEN)]
        if not opened:
            return decision
        pick = self.least_recently_failed(opened)
        if pick is None:  # only providers that refuse the gateway's key: fail fast, never a 401
            raise UpstreamFailed("every candidate model is unavailable (its provider refused the gateway)")
        catalog = dict(self._holder.catalog)
        catalog[pick] = replace(catalog[pick], breaker=None)
        return choose_with(catalog)

    # -- provider-wide ---------------------------------------------------------------------

    def provider_refused(self, provider: str, why: str) -> None:
        """The provider refused the gateway's key or has no quota: all its models out for a while."""
        for b in self._by_name.values():
            if b.provider == provider and not (b.state == OPEN and b.key_refused):
                b.last_failure = self._clock()
                self._open(b, f"provider {why}", key=True)

    # -- state changes ---------------------------------------------------------------------

    def _trips(self, b: _Breaker) -> str | None:
        s = self.settings
        if b.in_a_row >= s.failure_threshold:
            return f"{b.in_a_row} failures in a row"
        total = b.ok + b.failed + b.prev_ok + b.prev_failed
        failed = b.failed + b.prev_failed
        if total >= s.min_requests and failed >= s.error_ratio * total:
            return f"{100 * failed // total}% of {total} attempts failed in {s.window_s:g}s"
        return None

    def _cooldown(self, b: _Breaker, key: bool) -> float:
        s = self.settings
        growth = float(2 ** min(b.opens - 1, 30))
        if key:  # a refused key: from key_cooldown_s, growing like the rest
            return min(s.key_cooldown_s * growth, max(s.max_cooldown_s, s.key_cooldown_s))
        return min(s.cooldown_s * growth, s.max_cooldown_s)

    def _open(self, b: _Breaker, why: str, *, key: bool = False, until: float | None = None,
              share: bool = True) -> None:
        b.opens += 1
        b.key_refused = key
        cooldown = self._cooldown(b, key) if until is None else max(0.0, until - self._clock())
        b.until = self._clock() + cooldown
        b.reason = f"{CIRCUIT_OPEN}: {why}"
        b.probing = False
        self._set(b, OPEN, share)
        self._schedule(b, cooldown)
        log.warning("circuit opened", extra={"model": b.name, "provider": b.provider, "reason": why,
                                             "cooldown_s": round(cooldown, 3)})

    def _half_open(self, b: _Breaker, share: bool = False) -> None:
        b.probing = False
        self._set(b, HALF_OPEN, share)

    def _close(self, b: _Breaker, share: bool = True) -> None:
        b.opens = b.in_a_row = b.ok = b.failed = b.prev_ok = b.prev_failed = 0
        b.probing = b.key_refused = False
        b.reason = ""
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
        self._set(b, CLOSED, share)
        log.info("circuit closed", extra={"model": b.name, "provider": b.provider})

    def _set(self, b: _Breaker, state: int, share: bool) -> None:
        before, b.state = b.state, state
        self.open_count += (state != CLOSED) - (before != CLOSED)
        b.changed_wall = time.time()
        if self._transitions is not None:
            self._transitions.labels(b.name, STATE_NAMES[state]).inc()
        self._publish(b)
        if share and state != HALF_OPEN:
            self.outbox[b.name] = self.snapshot(b.name)

    def _schedule(self, b: _Breaker, delay: float) -> None:
        if b.timer is not None:
            b.timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            b.timer = None  # no loop (unit tests): `admit` turns it half-open when asked
            return
        b.timer = loop.call_later(delay, self._cooldown_over, b)

    def _cooldown_over(self, b: _Breaker) -> None:
        b.timer = None
        if b.state == OPEN:
            self._half_open(b)

    def _publish(self, b: _Breaker) -> None:
        """Routing sees an open breaker as a rejection reason; half-open and closed are routable."""
        catalog = self._holder.catalog
        candidate = catalog.get(b.name)
        reason = b.reason if b.state == OPEN else None
        if candidate is not None and candidate.breaker != reason:
            self._holder.catalog = {**catalog, b.name: replace(candidate, breaker=reason)}

    # -- shared state (gateway/breaker_sync.py) ---------------------------------------------

    def snapshot(self, name: str) -> dict[str, Any]:
        b = self._by_name[name]
        return {"state": STATE_NAMES[b.state], "until_wall": time.time() + max(0.0, b.until - self._clock()),
                "reason": b.reason, "key_refused": b.key_refused, "changed_wall": b.changed_wall,
                "opens": b.opens}

    def adopt(self, name: str, shared: Mapping[str, Any]) -> None:
        """Another replica's newer state change for this model."""
        b = self._by_name.get(name)
        if b is None or float(shared.get("changed_wall", 0)) <= b.changed_wall:
            return
        if shared.get("state") == "open":
            until_wall = float(shared.get("until_wall", 0))
            if until_wall <= time.time():
                return
            b.opens = max(b.opens, int(shared.get("opens", 1))) - 1
            why = str(shared.get("reason", "")).removeprefix(f"{CIRCUIT_OPEN}: ") or "opened by another replica"
            self._open(b, why, key=bool(shared.get("key_refused")), until=self._clock() + until_wall - time.time(),
                       share=False)
        elif shared.get("state") == "closed" and b.state != CLOSED:
            self._close(b, share=False)
        b.changed_wall = float(shared.get("changed_wall", 0))

    def states(self) -> dict[str, tuple[str, str]]:
        """model -> (provider, state name), for metrics and explain."""
        return {name: (b.provider, STATE_NAMES[b.state]) for name, b in self._by_name.items()}

    def close(self) -> None:
        for b in self._by_name.values():
            if b.timer is not None:
                b.timer.cancel()
                b.timer = None


def _roll(b: _Breaker, now: float, window_s: float) -> None:
    """Two tumbling windows: the ratio looks at the current and the previous one."""
    if now - b.win_start < 2 * window_s:
        b.prev_ok, b.prev_failed = b.ok, b.failed
    else:
        b.prev_ok = b.prev_failed = 0
    b.ok = b.failed = 0
    b.win_start = now


class _BreakerCollector:
    """`gateway_breaker_state{model,provider}` at scrape time: 0 closed, 1 open, 2 half-open."""

    def __init__(self, breakers: Breakers) -> None:
        self._breakers = breakers

    def describe(self) -> list[Any]:
        return [GaugeMetricFamily("gateway_breaker_state", "Circuit breaker per model: 0 closed, 1 open, 2 half-open",
                                  labels=["model", "provider"])]

    def collect(self) -> list[Any]:
        family = GaugeMetricFamily("gateway_breaker_state", "Circuit breaker per model: 0 closed, 1 open, 2 half-open",
                                   labels=["model", "provider"])
        for name, (provider, state) in sorted(self._breakers.states().items()):
            family.add_metric([name, provider], STATE_NAMES.index(state))
        return [family]
