"""Builders shared by the budgets tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from budgets import LedgerEntry

NOW = datetime(2026, 11, 25, 13, 5, 9, tzinfo=UTC)


def entry(
    request_id: str,
    *,
    attempt: int = 0,
    ts: datetime = NOW,
    tenant: str = "search-team",
    model: str = "gpt-4o-mini",
    input_tokens: int = 100,
    output_tokens: int = 50,
    cached_input_tokens: int = 0,
    cost_usd: str | Decimal = "0.0001",
    status: str = "ok",
) -> LedgerEntry:
    return LedgerEntry(
        request_id=request_id,
        attempt=attempt,
        ts=ts,
        tenant=tenant,
        key_id="key-1",
        model=model,
        provider="openai",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
        cost_usd=Decimal(cost_usd),
        usage_estimated=False,
        status=status,
    )
