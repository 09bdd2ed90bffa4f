"""Soft budget alerts: ``alert_at: [0.5, 0.8, 1.0]`` on a budget.

When a tenant's *settled* spend in a window reaches a fraction of a cap, exactly one
structured log event (``budget alert``) and one increment of ``gateway_budget_alerts_total``
happen for that (tenant, window period, cap kind, fraction), across every replica: the
crossing is claimed in the ledger (``Ledger.claim_alert``), and only the claimer reports it.
With ``alerts.webhook_url`` set, the claimer also POSTs the event as JSON.

Checks run after a settle, in the background and coalesced per tenant: never on the
request path.
"""
from __future__ import annotations

import asyncio
import logging
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter

from budgets import Balance, BudgetLimit, StoreUnavailable

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger("gateway.alerts")


@dataclass(frozen=True)
class AlertRule:
    limit: BudgetLimit
    fractions: tuple[Decimal, ...]


def crossings(balance: Balance, fractions: tuple[Decimal, ...]) -> list[tuple[str, Decimal, Decimal]]:
    """(kind, fraction, used fraction) for every fraction the settled spend has reached."""
    out: list[tuple[str, Decimal, Decimal]] = []
    for kind, cap, spent in (("tokens", balance.max_tokens, balance.spent_tokens),
                             ("usd", balance.max_usd, balance.spent_usd)):
        if cap is None or cap <= 0:
            continue
        used = Decimal(spent) / Decimal(cap)
        out.extend((kind, f, used) for f in fractions if used >= f)
    return out


class BudgetAlerts:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._rules: dict[str, list[AlertRule]] = {}
        for tenant in rt.loaded.config.tenants:
            rules = [AlertRule(BudgetLimit(b.window, b.max_tokens, b.max_usd), tuple(b.alert_at))
                     for b in tenant.budgets if b.alert_at]
            if rules:
                self._rules[tenant.id] = rules
        self._reported: set[tuple[str, str, str, Decimal]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.fired = Counter("gateway_budget_alerts", "Budget alert crossings (once per window, all replicas)",
                             ["tenant", "window", "kind", "fraction"], registry=rt.metrics.registry)

    def after_settle(self, tenant: str | None) -> None:
        """Schedule a check of ``tenant``'s alert thresholds (cheap no-op without rules)."""
        if tenant is None or tenant not in self._rules:
            return
        if tenant in self._running:
            self._again.add(tenant)
            return
        self._running[tenant] = asyncio.get_running_loop().create_task(self._check_loop(tenant))

    async def _check_loop(self, tenant: str) -> None:
        try:
            while True:
                self._again.discard(tenant)
                await self.check(tenant, datetime.now(UTC))
                if tenant not in self._again:
                    return
        except StoreUnavailable as exc:
            log.warning("budget alert check skipped: store unavailable", extra={"tenant": tenant, "store": exc.store})
        finally:
            self._running.pop(tenant, None)

    async def check(self, tenant: str, now: datetime) -> int:
        """Report every newly reached threshold; returns how many this replica reported."""
        rules = self._rules.get(tenant, [])
        if not rules:
            return 0
        balances = await self._rt.ledger.balance(tenant, [r.limit for r in rules], now)
        fired = 0
        for rule, balance in zip(rules, balances):
            for kind, fraction, used in crossings(balance, rule.fractions):
                seen = (tenant, balance.window_key, kind, fraction)
                if seen in self._reported:
                    continue
                if len(self._reported) > 10_000:
                    self._reported.clear()  # old windows; a re-claim is refused by the ledger anyway
                claimed = await self._rt.ledger.claim_alert(tenant, balance.window_key, f"{kind}:{fraction}")
                self._reported.add(seen)
                if claimed:
                    fired += 1
                    await self._report(tenant, balance, kind, fraction, used)
        return fired

    async def _report(self, tenant: str, balance: Balance, kind: str, fraction: Decimal, used: Decimal) -> None:
        event: dict[str, Any] = {
            "event": "budget_alert", "tenant": tenant, "window": balance.window,
            "window_key": balance.window_key, "kind": kind, "threshold": str(fraction),
            "used_fraction": str(used.quantize(Decimal("0.0001"))),
            "limit": str(balance.max_tokens if kind == "tokens" else balance.max_usd),
            "spent": str(balance.spent_tokens if kind == "tokens" else balance.spent_usd),
        }
        log.warning("budget alert", extra=event)
        self.fired.labels(tenant, balance.window, kind, str(fraction)).inc()
        webhook = self._rt.loaded.config.alerts
        if webhook.webhook_url:
            try:
                await asyncio.to_thread(_post, webhook.webhook_url, event, webhook.timeout_s)
            except OSError as exc:
                log.warning("budget alert webhook failed", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        tasks = list(self._running.values())
        await asyncio.gather(*tasks, return_exceptions=True)


def _post(url: str, event: dict[str, Any], timeout_s: float) -> None:
    request = urllib.request.Request(url, data=orjson.dumps(event), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()
