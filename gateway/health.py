"""Active health checks for the providers that ask for one (`health_check_interval_s`).

Each checked provider gets one task that GETs its health URL (default `{base_url}/models`)
every interval. When a provider changes state, the runtime's catalog is replaced by a new
dict whose Candidates for that provider carry the new `healthy` (dataclasses.replace):
never mutated in place, so a request that read `runtime.catalog` routes on one consistent
snapshot, and routing skips a down provider with the reason "unhealthy".

What counts as down:
- nothing listening, a reset or refused connection, or a non-2xx answer: down at once,
  so a stopped local server is skipped from the next probe on;
- no answer within `health_check_timeout_s`: down only after TIMEOUTS_BEFORE_DOWN probes
  in a row, because a single-slot server (llama-cpp-python) answers late while it generates.
One good answer brings a provider back, without a restart.

Failed requests are deliberately not health signals here: llama.cpp answers a malformed
request with 500, and that must not take a healthy server out of rotation.

The probe speaks just enough HTTP/1.1 (one GET, read the status line) on asyncio streams:
adapters/http.py owns the proxying client and is the only module that imports aiohttp.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Gauge

from gateway.config import LoadedConfig, ProviderConfig
from routing_policies import Candidate

log = logging.getLogger("gateway.health")

TIMEOUTS_BEFORE_DOWN = 3
_MAX_BODY = 64 * 1024


class CatalogHolder(Protocol):
    """What the checker updates: the Runtime (its `catalog` is read and replaced)."""

    catalog: dict[str, Candidate]


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str = ""  # why not ok, short and safe to show operators (no bodies, no keys)
    timed_out: bool = False


@dataclass(frozen=True)
class ProviderHealth:
    provider: str
    url: str
    healthy: bool = True
    reason: str = ""  # why it is down; "" while up
    checked: bool = False
    timeouts_in_a_row: int = 0
    changed_at: float = 0.0  # time.monotonic() of the last change of `healthy`

    def describe(self) -> str:
        return "up" if self.healthy else f"down: GET {self.url}: {self.reason}"


def health_url(provider: ProviderConfig) -> str:
    return provider.health_check_url or provider.base_url.rstrip("/") + "/models"


async def probe(url: str, *, timeout_s: float, api_key: str | None = None) -> ProbeResult:
    """One GET of `url`; ok on any 2xx status."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "User-Agent: model-gateway-health",
             "Accept: */*", "Connection: close"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if secure else None)
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            await _drain_body(reader)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout_s:g}s", timed_out=True)
    except ConnectionRefusedError:
        return ProbeResult(False, "connection refused")
    except ConnectionResetError:  # e.g. a server closing its listening socket mid-connect
        return ProbeResult(False, "connection reset")
    except OSError as exc:  # strerror may carry the address; the errno name does not
        return ProbeResult(False, f"connection failed ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})")
    except ValueError:  # a status line longer than the stream limit
        return ProbeResult(False, "not an HTTP answer")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return _status_result(status_line)


async def _drain_body(reader: asyncio.StreamReader) -> None:
    """Read (and drop) the answer, so the server is not cut off mid-write."""
    received = 0
    while received < _MAX_BODY:
        chunk = await reader.read(_MAX_BODY)
        if not chunk:
            return
        received += len(chunk)


def _status_result(status_line: bytes) -> ProbeResult:
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return ProbeResult(False, "not an HTTP answer" if status_line else "connection closed without an answer")
    status = int(fields[1])
    if 200 <= status < 300:
        return ProbeResult(True)
    return ProbeResult(False, f"answered HTTP {status}")


def next_state(state: ProviderHealth, result: ProbeResult, now: float) -> ProviderHealth:
    """The pure state machine: a probe result applied to a provider's health."""
    if result.ok:
        healthy, reason, timeouts = True, "", 0
    elif result.timed_out:
        timeouts = state.timeouts_in_a_row + 1
        healthy = state.healthy and timeouts < TIMEOUTS_BEFORE_DOWN
        reason = "" if healthy else f"{result.reason} ({timeouts} probes in a row)"
    else:
        healthy, reason, timeouts = False, result.reason, 0
    changed = healthy != state.healthy or not state.checked
    return replace(state, healthy=healthy, reason=reason, checked=True, timeouts_in_a_row=timeouts,
                   changed_at=now if changed else state.changed_at)


def with_health(catalog: Mapping[str, Candidate], models_by_provider: Mapping[str, Iterable[str]],
                up: Mapping[str, bool], base_healthy: Mapping[str, bool]) -> dict[str, Candidate]:
    """A new catalog: each checked provider's models marked up or down.

    `base_healthy` is what the config alone says (a hosted model without its key is never
    healthy, whatever a probe says).
    """
    updated = dict(catalog)
    for provider, is_up in up.items():
        for name in models_by_provider.get(provider, ()):
            candidate = updated.get(name)
            if candidate is not None:
                updated[name] = replace(candidate, healthy=is_up and base_healthy.get(name, True))
    return updated


def models_by_provider(loaded: LoadedConfig) -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[str]] = {}
    for name, model in loaded.models.items():
        grouped.setdefault(model.provider, []).append(name)
    return {provider: tuple(names) for provider, names in grouped.items()}


class HealthChecker:
    """One probe loop per checked provider; publishes health into `holder.catalog`."""

    def __init__(self, loaded: LoadedConfig, holder: CatalogHolder, *,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._providers = [p for p in loaded.providers.values() if p.health_check_interval_s]
        self._holder = holder
        self._clock = clock
        self._models = models_by_provider(loaded)
        self._base_healthy = {name: c.healthy for name, c in holder.catalog.items()}
        self.states = {p.name: ProviderHealth(p.name, health_url(p)) for p in self._providers}
        self._tasks: list[asyncio.Task[None]] = []
        self._up_gauge = Gauge("gateway_provider_up", "1 while a health-checked provider answers its probe",
                               ["provider"], registry=registry) if registry is not None and self._providers else None

    @property
    def enabled(self) -> bool:
        return bool(self._providers)

    async def start(self) -> None:
        """Probe every checked provider once (so routing starts on facts), then keep probing."""
        await asyncio.gather(*(self.check(p) for p in self._providers))
        self._tasks = [asyncio.create_task(self._loop(p), name=f"health:{p.name}") for p in self._providers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def check(self, provider: ProviderConfig) -> ProviderHealth:
        result = await probe(health_url(provider), timeout_s=provider.health_check_timeout_s,
                             api_key=provider.api_key())
        before = self.states[provider.name]
        after = next_state(before, result, self._clock())
        self.states[provider.name] = after
        if after.healthy != before.healthy or not before.checked:
            self._publish(provider.name, after)
        return after

    async def _loop(self, provider: ProviderConfig) -> None:
        interval = provider.health_check_interval_s or 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(provider)
            except Exception:  # a bug in one probe must not end health checking for good
                log.exception("health check crashed", extra={"provider": provider.name})

    def _publish(self, provider: str, state: ProviderHealth) -> None:
        self._holder.catalog = with_health(self._holder.catalog, self._models, {provider: state.healthy},
                                           self._base_healthy)
        if self._up_gauge is not None:
            self._up_gauge.labels(provider).set(1 if state.healthy else 0)
        if state.healthy:
            log.info("provider up", extra={"provider": provider, "health_url": state.url})
        else:
            log.warning("provider down", extra={"provider": provider, "health_url": state.url,
                                                "reason": state.reason})


def probe_now(loaded: LoadedConfig) -> dict[str, ProviderHealth]:
    """One probe round for one-shot commands (`gateway explain`), in a private event loop.

    Returns {} when called inside a running loop: a server passes its own live state instead
    of blocking its loop here.
    """
    providers = [p for p in loaded.providers.values() if p.health_check_interval_s]
    if not providers:
        return {}
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return {}

    async def one_round() -> list[ProviderHealth]:
        results = await asyncio.gather(*(
            probe(health_url(p), timeout_s=p.health_check_timeout_s, api_key=p.api_key()) for p in providers))
        now = time.monotonic()
        return [next_state(ProviderHealth(p.name, health_url(p)), r, now) for p, r in zip(providers, results)]

    return {state.provider: state for state in asyncio.run(one_round())}
