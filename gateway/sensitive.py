"""Secrets and PII detection shared by the audit redactor and the routing data class.

`find_sensitive(text)` returns non-overlapping `Finding`s sorted by start; `redact(text)`
replaces each with a typed placeholder that keeps the original length and a short hash
(`[EMAIL len=17 h=3f2a9c1b]`) so two records can be compared without storing the value.

Speed matters (this runs on request bodies): every detector is a precompiled regex, and a
single cheap pre-check regex tells clean text apart before any of them run.  Checksummed
kinds (CARD via Luhn, IBAN via mod-97) drop candidates that fail the check, which keeps
order numbers and timestamps from being reported as cards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KINDS", "Finding", "find_sensitive", "redact"]


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _phone_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 9 <= digits <= 15


_Check = Callable[[str], bool]


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    check: _Check | None = None
    # Literal substrings, one of which must occur in the text (case-sensitive) for the
    # pattern to be worth running; `lowered` checks them against text.lower() instead.
    triggers: tuple[str, ...] = ()
    lowered: bool = False


_SECRET_WORDS = ("api", "secret", "token", "passw", "pwd", "auth")

# Order matters: earlier detectors win when matches overlap (PRIVATE_KEY blocks first,
# the specific key shapes before the generic ones).
_DETECTORS: tuple[_Detector, ...] = (
    _Detector("PRIVATE_KEY", re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    ), triggers=("-----BEGIN",)),
    _Detector("JWT", re.compile(
        r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"), triggers=("eyJ",)),
    _Detector("ANTHROPIC_KEY", re.compile(r"sk-ant-[A-Za-z0-9_-]{20,}"), triggers=("sk-ant-",)),
    _Detector("OPENAI_KEY", re.compile(
        r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), triggers=("sk-",)),
    _Detector("AWS_KEY", re.compile(
        r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"), triggers=("AKIA", "ASIA")),
    _Detector("AWS_KEY", re.compile(
        r"(?i)aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
    ), triggers=("secret",), lowered=True),
    _Detector("GENERIC_SECRET", re.compile(
        r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"
    ), triggers=("_", "xox", "AIza")),
    _Detector("GENERIC_SECRET", re.compile(
        r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|auth)[\"']?\s*[:=]\s*[\"']?"
        r"(?P<value>[^\s\"',;]{8,})"
    ), triggers=_SECRET_WORDS, lowered=True),
    _Detector("EMAIL", re.compile(
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), triggers=("@",)),
)

# Number-shaped kinds.  Scanning every character with these is the expensive part, so one
# cheap ASCII scan finds runs of digits and separators first, and the exact patterns only
# run in and around runs holding at least 9 digits (the fewest any phone/card/IBAN has).
_NUMBER_RUN = re.compile(r"[0-9+(][0-9 .()+-]{7,}")
_NOT_DIGITS = str.maketrans("", "", " .()+-")
_DIGIT_GROUP = re.compile(r"[0-9]+")
_IBAN = _Detector("IBAN", re.compile(
    r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_ok)
_PHONE = _Detector("PHONE", re.compile(
    r"(?<![\w+.,])(?:"
    r"\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,5}\)?){1,5}"           # +44 20 7946 0958, +1 (415) 555-0132
    r"|\([0-9]{2,5}\)[ .-]?[0-9]{3,4}[ .-]?[0-9]{3,4}"         # (415) 555 0199
    r"|[0-9]{3}([ .-])[0-9]{3}\1[0-9]{4}"                      # 415-555-0132
    r"|0[0-9]{1,4}(?:[ .-][0-9]{2,8}){1,4}"                    # 020 7946 0958, 06 12 34 56 78
    r")(?![\w]|[.,][0-9])"
), _phone_ok)


def _scan_cards(collector: _Collector, start: int, end: int) -> None:
    """Luhn-valid 13-19 digit numbers, contiguous or grouped by single spaces / dashes.

    Groups are tried from every starting group (a card can follow a phone number in
    the same run of digits), longest valid span first."""
    text = collector.text
    groups = [m.span() for m in _DIGIT_GROUP.finditer(text, start, end)]
    i = 0
    while i < len(groups):
        best = -1
        digits = 0
        for j in range(i, len(groups)):
            if j > i:
                gap = text[groups[j - 1][1]:groups[j][0]]
                if gap not in (" ", "-"):
                    break
            digits += groups[j][1] - groups[j][0]
            if digits > 19:
                break
            if digits >= 13 and _luhn_ok(text[groups[i][0]:groups[j][1]]):
                best = j
        if best >= 0 and collector.add("CARD", groups[i][0], groups[best][1]):
            i = best + 1
        else:
            i += 1


KINDS: frozenset[str] = frozenset({d.kind for d in _DETECTORS} | {"IBAN", "CARD", "PHONE"})


class _Collector:
    """Accumulates non-overlapping findings; first come, first kept."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.found: list[Finding] = []

    def scan(self, det: _Detector, pos: int = 0, endpos: int | None = None) -> None:
        text = self.text
        matches = det.pattern.finditer(text, pos, len(text) if endpos is None else endpos)
        has_value = "value" in det.pattern.groupindex
        for match in matches:
            # A `value` group marks the secret inside `name = value` shapes.
            start, end = match.span("value") if has_value else match.span()
            if det.check is not None and not det.check(text[start:end]):
                continue
            self.add(det.kind, start, end)

    def add(self, kind: str, start: int, end: int) -> bool:
        if any(start < f.end and f.start < end for f in self.found):
            return False
        self.found.append(Finding(kind, start, end))
        return True


def _triggered(det: _Detector, text: str, lowered: str | None) -> bool:
    haystack = lowered if det.lowered else text
    return haystack is not None and any(t in haystack for t in det.triggers)


def find_sensitive(text: str) -> list[Finding]:
    """All secrets / PII spans in `text`, non-overlapping, sorted by start."""
    if not text:
        return []
    collector = _Collector(text)
    # Keyword-style secrets need an assignment (`password: ...`), so skip lowering otherwise.
    lowered = text.lower() if (":" in text or "=" in text) else None
    for det in _DETECTORS:
        if _triggered(det, text, lowered):
            collector.scan(det)
    for run in _NUMBER_RUN.finditer(text):
        if len(run.group().translate(_NOT_DIGITS)) < 9:
            continue
        start, end = run.span()
        collector.scan(_IBAN, max(0, start - 12), min(len(text), end + 24))
        _scan_cards(collector, start, end)
        collector.scan(_PHONE, start, end)
    found = collector.found
    found.sort(key=lambda f: f.start)
    return found


def placeholder(kind: str, value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"[{kind} len={len(value)} h={digest}]"


def redact(text: str) -> str:
    """`text` with every finding replaced by `[KIND len=N h=xxxxxxxx]`."""
    findings = find_sensitive(text)
    if not findings:
        return text
    parts: list[str] = []
    pos = 0
    for f in findings:
        parts.append(text[pos:f.start])
        parts.append(placeholder(f.kind, text[f.start:f.end]))
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)
