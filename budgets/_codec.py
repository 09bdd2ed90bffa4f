"""JSON for reservations and ledger rows (spool lines, Redis reservation records)."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

from budgets.ledger import LedgerEntry, RequestRef, Reservation


def entry_to_json(e: LedgerEntry) -> dict[str, Any]:
    return {
        "request_id": e.request_id, "attempt": e.attempt, "ts": e.ts.isoformat(),
        "tenant": e.tenant, "key_id": e.key_id, "model": e.model, "provider": e.provider,
        "input_tokens": e.input_tokens, "output_tokens": e.output_tokens,
        "cached_input_tokens": e.cached_input_tokens, "cost_usd": str(e.cost_usd),
        "usage_estimated": e.usage_estimated, "status": e.status,
        "price_version": e.price_version, "cache_write_tokens": e.cache_write_tokens,
        "usage_raw": usage_numbers(e.usage_raw),
    }  # fmt: skip


def usage_numbers(raw: Any) -> dict[str, Any] | None:
    """A provider's usage object with only its numbers (nested objects kept, numbers only):
    what the ledger stores, so no string a provider puts there can carry content."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(key, str):
            continue
        if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = usage_numbers(value)
    return out


def entry_from_json(d: dict[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        **{**d, "ts": datetime.fromisoformat(d["ts"]), "cost_usd": Decimal(d["cost_usd"])}
    )


def ref_to_json(ref: RequestRef | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    return {"request_id": ref.request_id, "key_id": ref.key_id, "model": ref.model,
            "provider": ref.provider}  # fmt: skip


def ref_from_json(d: dict[str, Any] | None) -> RequestRef | None:
    return None if d is None else RequestRef(**d)


def reservation_to_json(r: Reservation) -> dict[str, Any]:
    return {
        "id": r.id, "tenant": r.tenant, "tokens": r.tokens, "usd": str(r.usd),
        "window_keys": list(r.window_keys), "created_at": r.created_at.isoformat(),
        "ref": ref_to_json(r.ref),
    }  # fmt: skip


def reservation_from_json(d: dict[str, Any]) -> Reservation:
    return Reservation(
        id=d["id"],
        tenant=d["tenant"],
        tokens=int(d["tokens"]),
        usd=Decimal(d["usd"]),
        window_keys=tuple(d["window_keys"]),
        created_at=datetime.fromisoformat(d["created_at"]),
        ref=ref_from_json(d.get("ref")),
    )
