"""The audit hash chain: sealing records as they are written, and verifying a stored log.

Each record carries `seq` (its position in the database: 1, 2, 3, ... across every
replica), `segment` (which local JSON-lines file it was written through: one per replica,
or per state directory its workers share) and, chained per segment, `prev_hash` (the `hash`
of the segment's previous record, or 64 zeros for its first) and `hash` = SHA-256 of the
record's canonical JSON (sorted keys, `hash` set to ""). Editing a record breaks its own
hash; removing or inserting one breaks the database's run of `seq`s and the next record's
link in its segment. Records written before segments existed form one chain (segment "").

Retention removes the oldest records on purpose. The purge writes a `kind: purge` record
naming the last removed `seq` (`details.purged_through_seq`) and, per segment, the hash of
its last removed record (`details.anchors`), so each segment's oldest survivor must link to
an anchor that a later, chained purge record vouches for; records removed any other way
show up as a broken link.

The database holds every segment; a replica's JSON-lines copy holds its own segment(s),
which must end where the database's do. Known limits of an unkeyed chain: whoever can
rewrite the store can recompute every hash after the point they edit, and dropping a
segment's newest records leaves no link behind (the copies' heads are compared for that).
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, is_dataclass
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
    data = _plain(record)
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


def _plain(record: Any) -> dict[str, Any]:
    """The record as a dict whose dataclass parts (its attempts) are dicts too, so every level
    serialises sorted; cheaper than a JSON round trip. Other values are left to orjson, which
    sorts dict keys at every level itself."""
    data = dict(vars(record))
    attempts = data.get("attempts")
    if attempts and is_dataclass(attempts[0]):
        data["attempts"] = [dict(vars(attempt)) for attempt in attempts]
    return data


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
    # segment -> (seq, hash) of its newest record here; "" is the segment of records older than segments
    segments: dict[str, tuple[int, str]] = field(default_factory=dict)
    marks: PurgeMarks | None = None  # what the purge records here vouch for

    def describe(self) -> str:
        if self.ok:
            head = f", head seq {self.head_seq} hash {self.head_hash[:16]}" if self.head_hash else ""
            segments = f" in {len(self.segments)} segment(s)" if self.segments else ""
            return f"{self.source}: ok, {self.checked} records{segments}{head}"
        who = f" (request_id {self.request_id})" if self.request_id else ""
        return f"{self.source}: BROKEN at seq {self.broken_seq}{who}: {self.problem}"


@dataclass(frozen=True)
class PurgeMarks:
    """What retention purges removed: the `seq`s they went through, and per segment the hash
    of its last removed record (which its oldest survivor links to)."""

    through: frozenset[int] = frozenset()
    anchors: frozenset[tuple[str, str]] = frozenset()

    def __or__(self, other: PurgeMarks) -> PurgeMarks:
        return PurgeMarks(self.through | other.through, self.anchors | other.anchors)

    @property
    def newest(self) -> int:
        return max(self.through, default=0)


def segment_of(data: dict[str, Any]) -> str:
    segment = data.get("segment")
    return segment if isinstance(segment, str) else ""


def purge_marks(records: Iterable[dict[str, Any]]) -> PurgeMarks:
    through: set[int] = set()
    anchors: set[tuple[str, str]] = set()
    for data in records:
        details = data.get("details")
        if data.get("kind") != "purge" or not isinstance(details, dict):
            continue
        if isinstance(details.get("purged_through_seq"), int):
            through.add(details["purged_through_seq"])
        per_segment = details.get("anchors")
        if isinstance(per_segment, dict):
            anchors.update((str(s), h) for s, h in per_segment.items() if isinstance(h, str))
        elif isinstance(details.get("anchor_hash"), str):  # purges from before segments: one chain
            anchors.add(("", details["anchor_hash"]))
    return PurgeMarks(frozenset(through), frozenset(anchors))


def verify(rows: Iterable[tuple[int | None, str | bytes]], source: str, *,
           known: PurgeMarks | None = None) -> VerifyResult:
    """Check a store's records, given as (position, stored JSON) in stored order.

    `position` is the database's `seq` column: there every `seq` is present once, in order,
    from 1 or from just after a purge. None marks a local JSON-lines copy: it holds only the
    segments written through it, so its `seq`s only increase, and records the database has
    already purged may remain (`known`: the database's purge marks)."""
    parsed: list[tuple[int | None, dict[str, Any]]] = []
    for line_no, (position, text) in enumerate(rows, 1):
        where = position if position is not None else line_no
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            return VerifyResult(source, len(parsed), False, where, None, "record is not valid JSON (altered)")
        if not isinstance(data, dict):
            return VerifyResult(source, len(parsed), False, where, None, "record is not a JSON object (altered)")
        parsed.append((position, data))
    marks = purge_marks(d for _, d in parsed) | (known or PurgeMarks())
    if not parsed:
        return VerifyResult(source, 0, True, marks=marks)
    prev: dict[str, Any] | None = None
    heads: dict[str, dict[str, Any]] = {}  # the newest record so far of each segment
    for count, (position, data) in enumerate(parsed):
        problem = _problem(position, data, prev, heads, marks)
        if problem is not None:
            seq = data.get("seq")
            return VerifyResult(source, count, False, seq if isinstance(seq, int) else position or count + 1,
                                data.get("request_id"), problem)
        prev = heads[segment_of(data)] = data
    assert prev is not None
    return VerifyResult(source, len(parsed), True, head_seq=prev.get("seq"), head_hash=prev.get("hash"),
                        segments={s: (d["seq"], d["hash"]) for s, d in heads.items()}, marks=marks)


def _problem(position: int | None, data: dict[str, Any], prev: dict[str, Any] | None,
             heads: dict[str, dict[str, Any]], marks: PurgeMarks) -> str | None:
    seq = data.get("seq")
    if not isinstance(seq, int) or (position is not None and seq != position):
        return f"stored position {position} does not match the record's seq {seq!r} (altered or moved)"
    if not isinstance(data.get("hash"), str) or record_hash(data) != data["hash"]:
        return "content does not match its hash (record altered)"
    order = _order_problem(position is not None, seq, prev, marks)
    if order is not None:
        return order
    segment = segment_of(data)
    named = f"segment {segment}" if segment else "the chain"
    link, before = data.get("prev_hash"), heads.get(segment)
    if before is None:
        if link == GENESIS or (segment, link) in marks.anchors:
            return None
        if position is None and seq <= marks.newest:
            return None  # a local copy still holding records the database has purged
        return (f"the oldest record of {named} links to a record that is missing, and no purge record "
                "covers it (records removed)")
    if link != before.get("hash"):
        return (f"prev_hash does not match the hash of seq {before['seq']}, the previous record of {named} "
                "(a record was removed, inserted or replaced before it)")
    return None


def _order_problem(contiguous: bool, seq: int, prev: dict[str, Any] | None, marks: PurgeMarks) -> str | None:
    """The database holds every seq once, consecutively; a local copy a rising subset."""
    if prev is None:
        if not contiguous or seq == 1 or seq - 1 in marks.through:
            return None
        return f"the oldest record follows seq {seq - 1}, which is missing and no purge record covers it (records removed)"
    last = prev["seq"]
    if seq <= last:
        return f"seq {seq} comes after seq {last} (records moved or duplicated)"
    if contiguous and seq != last + 1:
        return f"records {last + 1}..{seq - 1} are missing (removed)"
    return None
