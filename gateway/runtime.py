"""Everything a running gateway holds, built once from the config and settings.

No module-level state: the app gets one `Runtime`, and tests build their own.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from adapters.base import Endpoint
from adapters.http import UpstreamClient
from budgets import BudgetLimit, Price, RateLimiter, RateLimits, SqliteLedger
from gateway import tokens
from gateway.audit import AuditWriter
from gateway.config import LoadedConfig, ModelConfig, ProviderConfig, TenantConfig
from gateway.keys import KeyAdmin, KeyStore
from gateway.metrics import Metrics
from gateway.settings import Settings
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
    )


def endpoint_for(provider: ProviderConfig) -> Endpoint:
    return Endpoint(
        provider=provider.name,
        type=provider.type,
        base_url=provider.base_url,
        api_key=provider.api_key(),
        timeout_s=provider.timeout_s,
        connect_timeout_s=provider.connect_timeout_s,
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
        self.ledger = SqliteLedger(str(db_path), flush_interval_s=settings.flush_interval_s)
        self.limiter = RateLimiter("memory://")
        self.audit = AuditWriter(db_path, loaded.audit_jsonl_path, flush_interval_s=settings.flush_interval_s)
        self.client = UpstreamClient(pool_size=settings.upstream_pool_size)
        self.admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else loaded.admin_key()
        self._id_prefix = "req_" + secrets.token_hex(8)
        self._id_counter = itertools.count(1)
        self.draining = False
        self.started = False
        self.in_flight = 0
        self._idle = asyncio.Event()

    @property
    def db_path(self) -> Path:
        path = self.loaded.sqlite_path
        if path is None:
            raise ValueError("only sqlite:/// state is supported by this build")
        return path

    def new_request_id(self) -> str:
        """Unique per process start (random prefix) and cheap (a counter): no syscall per request."""
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    async def start(self) -> None:
        await asyncio.to_thread(tokens.count_text, "warm up the tokenizer")
        await self.ledger.start()
        await self.audit.start()
        await self.keys.start()
        await self.client.start()
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
        await self.client.close()
        await self.keys.close()
        await self.ledger.close()
        await self.audit.close()
        await self.limiter.close()
        self.started = False

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        if self.in_flight == 0:
            self._idle.set()
