"""The unit of batched ledger writes shared by the Redis and PostgreSQL ledgers, and its
JSON form (what the spool file holds while a store is down)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from budgets._codec import (
    entry_from_json,
    entry_to_json,
    reservation_from_json,
    reservation_to_json,
)
from budgets.ledger import LedgerEntry, Reservation


@dataclass(slots=True)
class Op:
    """One settle (``reservation`` + rows), release (no rows) or record (no reservation).

    ``new`` is set by two-stage backends once the rows are durable: the rows that were not
    in the store before (only those may be counted). ``batch`` names the stage-two batch.
    """

    reservation: Reservation | None
    entries: list[LedgerEntry]
    new: list[LedgerEntry] | None = None
    batch: str | None = None
    spooled: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps({
            "reservation": None if self.reservation is None else reservation_to_json(self.reservation),
            "entries": [entry_to_json(e) for e in self.entries],
            "new": None if self.new is None else [entry_to_json(e) for e in self.new],
            "batch": self.batch,
        })  # fmt: skip

    @classmethod
    def from_json(cls, line: bytes) -> Op:
        d: dict[str, Any] = orjson.loads(line)
        res = d.get("reservation")
        new = d.get("new")
        return cls(
            reservation=None if res is None else reservation_from_json(res),
            entries=[entry_from_json(e) for e in d["entries"]],
            new=None if new is None else [entry_from_json(e) for e in new],
            batch=d.get("batch"),
            spooled=True,
        )


def unique_entries(ops: Sequence[Op]) -> dict[tuple[str, int], LedgerEntry]:
    """The rows of ``ops`` by (request id, attempt), each once (the first one seen)."""
    unique: dict[tuple[str, int], LedgerEntry] = {}
    for op in ops:
        for e in op.entries:
            unique.setdefault((e.request_id, e.attempt), e)
    return unique
