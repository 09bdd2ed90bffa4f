"""A request's data class, the routing input that keeps sensitive data local.

The class is the highest of: the tenant's `data_class`, the `x-gateway-data-class` header
(it can raise the class, never lower it) and a content scan of the message text, where any
secret or PII (gateway/sensitive.py) makes it at least `confidential`. Nothing else in a
prompt can change routing: only message text is scanned, and only for those detectors.

The scan is skipped when the class is already `confidential` or higher, since it could
not raise it further. The verdict keeps the detector kinds that fired, never the text.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.sensitive import find_sensitive
from routing_policies import DATA_CLASSES

__all__ = ["HEADER", "SCAN_FLOOR", "DataClassVerdict", "classify", "message_text", "user_hash"]

HEADER = "x-gateway-data-class"
SCAN_FLOOR = "confidential"
_RANK = {name: rank for rank, name in enumerate(DATA_CLASSES)}


@dataclass(frozen=True)
class DataClassVerdict:
    data_class: str
    tenant_class: str
    raised_by: tuple[str, ...] = ()  # "header", "scan": what raised it above the tenant's class
    findings: tuple[str, ...] = ()  # detector kinds that fired (e.g. AWS_KEY), sorted, no values
    scanned: bool = False

    def describe(self) -> str:
        """`confidential (tenant internal; content scan: AWS_KEY)`, for errors and explain."""
        parts = [f"tenant {self.tenant_class}"]
        if "header" in self.raised_by:
            parts.append(f"{HEADER} header")
        if self.findings:
            parts.append(f"content scan: {', '.join(self.findings)}")
        return f"{self.data_class} ({'; '.join(parts)})"

    def audit_features(self) -> dict[str, Any]:
        return {"data_class": self.data_class, "tenant_data_class": self.tenant_class,
                "data_class_raised_by": list(self.raised_by), "sensitive_findings": list(self.findings),
                "content_scanned": self.scanned}


def classify(tenant_class: str, header: str | None, body: Mapping[str, Any]) -> DataClassVerdict:
    """The request's data class; an unknown header value is a 400, never silently ignored."""
    current, raised = tenant_class, []
    if header is not None:
        asked = header.strip().lower()
        if asked not in _RANK:
            raise InvalidRequest(f"'{HEADER}' must be one of {', '.join(DATA_CLASSES)}", param=HEADER)
        if _RANK[asked] > _RANK[current]:
            current = asked
            raised.append("header")
    if _RANK[current] >= _RANK[SCAN_FLOOR]:
        return DataClassVerdict(current, tenant_class, tuple(raised))
    kinds = tuple(sorted({finding.kind for finding in find_sensitive(message_text(body))}))
    if kinds:
        current = SCAN_FLOOR
        raised.append("scan")
    return DataClassVerdict(current, tenant_class, tuple(raised), kinds, scanned=True)


def message_text(body: Mapping[str, Any]) -> str:
    """The text a user sent: message contents (OpenAI or Anthropic shapes), `system`, embedding input."""
    texts: list[str] = []
    _collect(body.get("system"), texts)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                _collect(message.get("content"), texts)
    value = body.get("input")
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        texts.extend(item for item in value if isinstance(item, str))
    return "\n".join(texts)


def user_hash(body: Mapping[str, Any]) -> str:
    """A pseudonym for the request's end user (OpenAI `user`, Anthropic `metadata.user_id`),
    for splits sticky per user and for the audit: the id itself is never kept."""
    user = body.get("user")
    if not isinstance(user, str):
        metadata = body.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user, str) or not user:
        return ""
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _collect(content: Any, texts: list[str], depth: int = 0) -> None:
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list) and depth < 3:
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            elif "content" in part:  # Anthropic tool_result blocks nest their content
                _collect(part["content"], texts, depth + 1)
