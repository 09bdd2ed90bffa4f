"""Secrets and PII detection shared by the audit redactor and the routing data class.

`find_sensitive(text)` returns non-overlapping `Finding`s sorted by start; `redact(text)`
replaces each with a typed placeholder that keeps the original length and a short hash
(`[EMAIL len=17 h=3f2a9c1b]`) so two records can be compared without storing the value.

Speed matters (this runs on request bodies): every detector is a precompiled regex, and a
single cheap pre-check regex tells clean text apart before any of them run.  Checked
kinds drop candidates that fail their rule, which keeps order numbers and timestamps from
being reported: CARD (Luhn), IBAN (mod-97), US_SSN (no area 000/666/9xx, group 00, serial
0000), UK_NINO (HMRC prefix letters and suffix A-D) and URL_PASSWORD (placeholders such as
`***`, `<password>` or `${DB_PASSWORD}` are not secrets).
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


# Template and masked values in connection strings are not secrets: `user:***@`, `user:xxxx@`,
# `user:<password>@`, `user:${DB_PASSWORD}@`, `user:{{ pass }}@`, `user:$DB_PASS@`, `user:%s@`,
# and the documentation placeholders `user:password@` / `user:pass@`.
_URL_PASSWORD_TEMPLATE = re.compile(
    r"[*xX.]+|<[^>]*>|\$\{[^}]*\}|\{\{?[^}]*\}\}?|\$[A-Z_][A-Z0-9_]*|%s"
    r"|(?i:(?:your[_-]?|my[_-]?)?(?:password|passwd|pass|pwd|secret))")


def _url_password_ok(candidate: str) -> bool:
    return _URL_PASSWORD_TEMPLATE.fullmatch(candidate) is None


def _ssn_ok(candidate: str) -> bool:
    """US SSN rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = candidate.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# UK National Insurance number: two prefix letters, six digits, suffix A-D. HMRC never uses
# D, F, I, U or V in the prefix, nor O as its second letter, nor the prefixes below. Q is
# accepted (HMRC's documented specimen is QQ 12 34 56 C: a prompt quoting one stays local).
_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def _nino_ok(candidate: str) -> bool:
    return candidate[:2] not in _NINO_BAD_PREFIXES


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
    # scheme://user:password@host (postgres://, redis://, https://, amqp:// ...): the password is
    # the finding. Before EMAIL, which would otherwise take `password@host.example`.
    # Anchored on the literal `://` (a fast substring search; a leading scheme class is ~25x slower).
    _Detector("URL_PASSWORD", re.compile(
        r"://[^\s:/?#@\[\]]*:(?P<value>[^\s/?#@\[\]]+)@(?=[^\s/?#@]*[A-Za-z0-9])"
    ), _url_password_ok, triggers=("://",)),
    _Detector("EMAIL", re.compile(
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), triggers=("@",)),
)

# Number-shaped kinds.  Scanning every character with these is the expensive part, so one
# cheap ASCII scan finds runs of digits and separators first, and the exact patterns only
# run in and around runs holding exactly 6 digits (a UK NINO's) or at least 9 (the fewest
# any phone/card/IBAN/SSN has).
_NUMBER_RUN = re.compile(r"[0-9+(][0-9 .()+-]{5,}")
_NOT_DIGITS = str.maketrans("", "", " .()+-")
_DIGIT_GROUP = re.compile(r"[0-9]+")
_IBAN = _Detector("IBAN", re.compile(
    r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_ok)
_NINO = _Detector("UK_NINO", re.compile(
    r"(?<![A-Za-z0-9])[A-CEGHJ-TW-Z][A-CEGHJ-NP-TW-Z](?: ?[0-9]{2}){3} ?[A-D](?![A-Za-z0-9])"), _nino_ok)
_SSN = _Detector("US_SSN", re.compile(r"(?<![\w-])[0-9]{3}-[0-9]{2}-[0-9]{4}(?![\w-])"), _ssn_ok)
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


KINDS: frozenset[str] = frozenset({d.kind for d in _DETECTORS} | {"IBAN", "CARD", "US_SSN", "UK_NINO", "PHONE"})


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
    if haystack is None:
        return False
    for trigger in det.triggers:  # a loop, not any(genexpr): this runs for every detector on every request
        if trigger in haystack:
            return True
    return False


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
        digits = len(run.group().translate(_NOT_DIGITS))
        start, end = run.span()
        if digits == 6:  # the prefix letters (and a space) precede the run, the suffix follows it
            collector.scan(_NINO, max(0, start - 4), min(len(text), end + 2))
        if digits < 9:
            continue
        collector.scan(_IBAN, max(0, start - 12), min(len(text), end + 24))
        collector.scan(_SSN, start, end)  # before PHONE: 012-34-5678 is an SSN's shape, not a phone's
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
