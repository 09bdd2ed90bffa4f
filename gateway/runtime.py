"""Everything a running gateway holds, built once from the config and settings.

No module-level state: the app gets one `Runtime`, and tests build their own.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from adapters.base import Endpoint, UpstreamStream
from adapters.http import UpstreamClient
from budgets import BudgetLimit, Price, RateLimits
from gateway import stores, tokens
from gateway.alerts import BudgetAlerts
from gateway.audit import AuditWriter
from gateway.audit_admin import record_config_changes
from gateway.audit_spool import AuditSpool
from gateway.breaker import Breakers, BreakerSettings
from gateway.breaker_sync import BreakerSync
from gateway.config import LoadedConfig, ModelConfig, ProviderConfig, TenantConfig
from gateway.dispatch import DispatchStats
from gateway.health import HealthChecker
from gateway.keys import KeyAdmin, KeyStore
from gateway.latency import LatencyTracker
from gateway.metrics import Metrics
from gateway.reload import PolicyReloader
from gateway.settings import Settings
from gateway.shadow import ShadowMirror
from gateway.shedding import LoadCollector, Shedder
from gateway.streaming import SlowCallWatch
from gateway.telemetry import Telemetry
from routing_policies import Candidate, CompiledPolicy

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class TenantRuntime:
    """A tenant's config, converted once into the types budgets and routing want."""

    config: TenantConfig
    budget_limits: tuple[BudgetLimit, ...]
    rate_limits: RateLimits


def candidate_for(model: ModelConfig, provider: ProviderConfig) -> Candidate:
    key_missing = bool(provider.api_key_env) and not provider.api_key()
    return Candidate(
        name=model.name,
        provider=provider.name,
        locality=provider.locality,
        data_boundary=model.data_boundary,
        quality=model.quality,
        capabilities=frozenset(model.capabilities),
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        input_usd_per_mtok=model.input_usd_per_mtok or Decimal(0),
        output_usd_per_mtok=model.output_usd_per_mtok or Decimal(0),
        healthy=not key_missing,
    )


def price_for(model: ModelConfig) -> Price:
    return Price(
        input_usd_per_mtok=model.input_usd_per_mtok or Decimal(0),
        output_usd_per_mtok=model.output_usd_per_mtok or Decimal(0),
        cached_input_usd_per_mtok=model.cached_input_usd_per_mtok,
        cache_write_usd_per_mtok=model.cache_write_usd_per_mtok,
    )


def endpoint_for(provider: ProviderConfig) -> Endpoint:
    return Endpoint(
        provider=provider.name,
        type=provider.type,
        base_url=provider.base_url,
        api_key=provider.api_key(),
        timeout_s=provider.timeout_s,
        connect_timeout_s=provider.connect_timeout_s,
        first_byte_timeout_s=provider.first_byte_timeout_s,
        idle_timeout_s=provider.idle_timeout_s,
        total_timeout_s=provider.total_timeout_s,
    )


class Runtime:
    def __init__(
        self,
        loaded: LoadedConfig,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.loaded = loaded
        self.sleep = sleep
        self.settings = settings
        self.rng = rng or random.Random()
        self.metrics = Metrics()
        self.policies: dict[str, CompiledPolicy] = dict(loaded.policies)
        self.models = loaded.models
        self.prices = {name: price_for(m) for name, m in loaded.models.items()}
        self.catalog = {
            name: candidate_for(m, loaded.providers[m.provider]) for name, m in loaded.models.items()
        }
        self.endpoints = {name: endpoint_for(p) for name, p in loaded.providers.items()}
        self.health = HealthChecker(loaded, self, registry=self.metrics.registry)  # replaces self.catalog on changes
        self.latency = LatencyTracker()  # publishes observed p95 into self.catalog
        self.latency.register(self.metrics.registry)
        self.reloader = PolicyReloader(self)  # replaces self.policies on a good reload
        self.shadow = ShadowMirror(self)
        self.tenants = {
            t.id: TenantRuntime(
                config=t,
                budget_limits=tuple(BudgetLimit(b.window, b.max_tokens, b.max_usd) for b in t.budgets),
                rate_limits=RateLimits(t.rate_limits.requests_per_minute, t.rate_limits.tokens_per_minute),
            )
            for t in loaded.config.tenants
        }
        db_path = self.db_path
        self.key_admin = KeyAdmin(db_path)
        self.keys = KeyStore(self.key_admin, loaded.config.tenants, refresh_s=settings.keys_refresh_s)
        self.ledger = stores.build_ledger(loaded, settings)  # SQLite, PostgreSQL or Redis: gateway/stores.py
        self.limiter = stores.build_limiter(loaded, settings)
        self.alerts = BudgetAlerts(self)
        self.audit = AuditWriter(db_path, loaded.audit_jsonl_path, flush_interval_s=settings.flush_interval_s,
                                 log_bodies=loaded.config.audit.log_bodies,
                                 retention_days=loaded.config.audit.retention_days)
        self.audit.spool = AuditSpool(loaded.spool_dir)  # failed audit writes wait on disk (gateway/audit_spool.py)
        self.telemetry = Telemetry.from_env()
        self.client = UpstreamClient(pool_size=settings.upstream_pool_size)
        self._wire_resilience(loaded, settings)
        self.admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else loaded.admin_key()
        self._id_prefix = "req_" + secrets.token_hex(8)
        self._id_counter = itertools.count(1)
        self.draining = False
        self.started = False
        self.in_flight = 0
        self._idle = asyncio.Event()

    def _wire_resilience(self, loaded: LoadedConfig, settings: Settings) -> None:
        """Breakers (publishing into self.catalog), shedding, retry counters, streams to cut at shutdown."""
        registry = self.metrics.registry
        self.breakers = Breakers({name: m.provider for name, m in loaded.models.items()}, self, BreakerSettings(
            failure_threshold=settings.breaker_failure_threshold, error_ratio=settings.breaker_error_ratio,
            window_s=settings.breaker_window_s, min_requests=settings.breaker_min_requests,
            cooldown_s=settings.breaker_cooldown_s, max_cooldown_s=settings.breaker_max_cooldown_s,
            key_cooldown_s=settings.breaker_key_cooldown_s), registry=registry)
        state = loaded.config.state
        self.breaker_sync = BreakerSync(self.breakers, state.redis_url, state.redis_key_prefix,
                                        interval_s=settings.breaker_sync_s) if state.redis_url else None
        self.shedder = Shedder(settings.max_active_requests, settings.max_queued_requests, settings.queue_timeout_s,
                               registry=registry)
        registry.register(LoadCollector(self.shedder, lambda: self.client.open_connections))
        self.dispatch_stats = DispatchStats(registry)
        self.slow_calls = SlowCallWatch()  # non-streamed requests: client disconnects cancel long upstream calls
        self.open_streams: dict[int, UpstreamStream] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests (/readyz 503) and end streams still open at the grace deadline.
        Safe to call from a signal handler."""
        if self.loop is None or self.draining:
            self.draining = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(self._arm_drain_deadline)

    def _arm_drain_deadline(self) -> None:
        if self._drain_timer is None:
            self._drain_timer = asyncio.get_running_loop().call_later(self.settings.drain_timeout_s, self.cut_streams)

    def cut_streams(self) -> None:
        """The grace deadline: every stream still relaying ends now with an in-band error, and settles."""
        if self.open_streams:
            log.warning("drain deadline reached: ending open streams", extra={"streams": len(self.open_streams)})
        for stream in list(self.open_streams.values()):
            stream.abort()

    @property
    def db_path(self) -> Path:
        """The gateway's own tables: a SQLite file, or (typed loosely) a PostgreSQL URL that
        gateway.db.connect understands."""
        return self.loaded.database  # type: ignore[return-value]

    def new_request_id(self) -> str:
        """Unique per process start (random prefix) and cheap (a counter): no syscall per request."""
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    async def start(self) -> None:
        await asyncio.to_thread(tokens.count_text, "warm up the tokenizer")
        await stores.migrate(self.loaded)  # PostgreSQL: schema created/upgraded by the gateway itself
        await self.ledger.start()
        await stores.record_prices(self.ledger, self.prices)  # rates behind each row's price_version
        await self.audit.start()
        await record_config_changes(self)
        await self.keys.start()
        await self.client.start()
        await self.health.start()
        self.latency.start(self)
        self.slow_calls.start()
        await self.reloader.start()
        if self.breaker_sync is not None:
            await self.breaker_sync.start()
        self.loop = asyncio.get_running_loop()
        self.started = True

    async def close(self) -> None:
        """Drain: wait for in-flight requests (bounded), then flush every buffer."""
        self.draining = True
        if self.in_flight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain deadline reached", extra={"in_flight": self.in_flight})
                self.cut_streams()  # in-band errors, then settled by their relays
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout=2.0)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self.breaker_sync is not None:
            await self.breaker_sync.close()
        self.breakers.close()
        await self.reloader.close()
        await self.shadow.close()
        await self.slow_calls.close()
        await self.latency.close()
        await self.health.close()
        await self.client.close()
        await self.keys.close()
        await self.alerts.close()
        await self.ledger.close()
        await self.audit.close()
        await self.limiter.close()
        await asyncio.to_thread(self.telemetry.shutdown)
        self.started = False

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        if self.in_flight == 0:
            self._idle.set()
