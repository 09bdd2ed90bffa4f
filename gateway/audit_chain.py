"""The audit hash chain: sealing records as they are written, and verifying a stored log.

Each record carries `seq` (1, 2, 3, ... per store), `prev_hash` (the `hash` of record
`seq - 1`, or 64 zeros for the first) and `hash` = SHA-256 of the record's canonical JSON
(sorted keys, `hash` set to ""). Editing a record breaks its own hash; removing or inserting
one breaks the next record's `prev_hash` link.

Retention removes the oldest records on purpose. The purge writes a `kind: purge` record
naming the last removed `seq` and its hash (`details.purged_through_seq`, `anchor_hash`),
so the oldest surviving record must link to an anchor that a later, chained purge record
vouches for; records removed any other way show up as a broken link.

Known limits of an unkeyed chain: whoever can rewrite the store can recompute every hash
after the point they edit, and dropping the newest records leaves no link behind. The
JSON-lines copy is checked too, and a store whose head lags the other copy is reported.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64
_OPTS = orjson.OPT_SORT_KEYS
_PLACEHOLDER = secrets.token_hex(32)
_PLACEHOLDER_BYTES = _PLACEHOLDER.encode()
_PLACEHOLDER_FIELD = b'"hash":"' + _PLACEHOLDER_BYTES + b'"'


def seal(record: Any, seq: int, prev_hash: str) -> tuple[bytes, str]:
    """Set `seq`, `prev_hash`, `hash` on a record (dataclass); return its stored JSON and hash."""
    record.seq, record.prev_hash, record.hash = seq, prev_hash, ""
    # Through a dict: orjson keeps dataclass fields in declaration order, and the canonical
    # form must not depend on the declaration (sorted keys at every level).
    data = orjson.loads(orjson.dumps(record))
    # One sorted pass: serialise with a per-process random placeholder as `hash`, then
    # swap it for "" (the hashed form) and for the digest (the stored form). Compact JSON,
    # so only that value's bytes change; if the placeholder is not unique, the slow path.
    data["hash"] = _PLACEHOLDER
    text = orjson.dumps(data, option=_OPTS)
    if text.count(_PLACEHOLDER_BYTES) == 1:
        digest = hashlib.sha256(text.replace(_PLACEHOLDER_FIELD, b'"hash":""')).hexdigest()
        stored = text.replace(_PLACEHOLDER_FIELD, b'"hash":"' + digest.encode() + b'"')
    else:  # pragma: no cover - a 256-bit random value showing up in a record
        data["hash"] = ""
        digest = hashlib.sha256(orjson.dumps(data, option=_OPTS)).hexdigest()
        data["hash"] = digest
        stored = orjson.dumps(data, option=_OPTS)
    record.hash = digest
    return stored, digest


def record_hash(data: dict[str, Any]) -> str:
    """The hash a stored record (parsed JSON) should carry."""
    unsealed = dict(data)
    unsealed["hash"] = ""
    return hashlib.sha256(orjson.dumps(unsealed, option=_OPTS)).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    source: str
    checked: int
    ok: bool
    broken_seq: int | None = None
    request_id: str | None = None
    problem: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None

    def describe(self) -> str:
        if self.ok:
            head = f", head seq {self.head_seq} hash {self.head_hash[:16]}" if self.head_hash else ""
            return f"{self.source}: ok, {self.checked} records{head}"
        who = f" (request_id {self.request_id})" if self.request_id else ""
        return f"{self.source}: BROKEN at seq {self.broken_seq}{who}: {self.problem}"


def verify(rows: Iterable[tuple[int | None, str | bytes]], source: str) -> VerifyResult:
    """Check a store's records, given as (position, stored JSON) in stored order.

    `position` is the store's own key for the record (the database's `seq` column), or
    None where the store has none (a JSON-lines file: the record's `seq` is used)."""
    parsed: list[tuple[int, dict[str, Any]]] = []
    for line_no, (position, text) in enumerate(rows, 1):
        where = position if position is not None else line_no
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            return VerifyResult(source, len(parsed), False, where, None, "record is not valid JSON (altered)")
        if not isinstance(data, dict):
            return VerifyResult(source, len(parsed), False, where, None, "record is not a JSON object (altered)")
        own = data.get("seq")
        parsed.append((position if position is not None else (own if isinstance(own, int) else -line_no), data))
    if not parsed:
        return VerifyResult(source, 0, True)
    anchors = {
        (d.get("details", {}).get("purged_through_seq"), d.get("details", {}).get("anchor_hash"))
        for _, d in parsed if d.get("kind") == "purge" and isinstance(d.get("details"), dict)
    }
    prev: dict[str, Any] | None = None
    for count, (position, data) in enumerate(parsed):
        problem = _problem(position, data, prev, anchors)
        if problem is not None:
            return VerifyResult(source, count, False, _seq(data, position), data.get("request_id"), problem)
        prev = data
    assert prev is not None
    return VerifyResult(source, len(parsed), True, head_seq=prev.get("seq"), head_hash=prev.get("hash"))


def _seq(data: dict[str, Any], position: int) -> int:
    seq = data.get("seq")
    return seq if isinstance(seq, int) else position


def _problem(position: int, data: dict[str, Any], prev: dict[str, Any] | None,
             anchors: set[tuple[Any, Any]]) -> str | None:
    seq = data.get("seq")
    if not isinstance(seq, int) or seq != position:
        return f"stored position {position} does not match the record's seq {seq!r} (altered or moved)"
    if not isinstance(data.get("hash"), str) or record_hash(data) != data["hash"]:
        return "content does not match its hash (record altered)"
    link = data.get("prev_hash")
    if prev is None:
        if seq == 1 and link == GENESIS:
            return None
        if (seq - 1, link) in anchors:
            return None
        return (f"the oldest record links to seq {seq - 1}, which is missing and no purge record "
                "covers it (records removed)")
    if link != prev.get("hash"):
        if seq != prev["seq"] + 1:
            return f"records {prev['seq'] + 1}..{seq - 1} are missing (removed)"
        return f"prev_hash does not match the hash of seq {prev['seq']} (a record was inserted or replaced before it)"
    if seq != prev["seq"] + 1:
        return f"seq jumps from {prev['seq']} to {seq} with a valid link (renumbered)"
    return None
