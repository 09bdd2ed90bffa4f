"""A request's data class, the routing input that keeps sensitive data local.

The class is the highest of: the tenant's `data_class`, the `x-gateway-data-class` header
(it can raise the class, never lower it) and a content scan of what the model will read, where
any secret or PII (gateway/sensitive.py) makes it at least `confidential`. Nothing else in a
prompt can change routing: only that text is scanned, and only for those detectors.

What is scanned: `system`, every message's text (OpenAI parts, Anthropic blocks, tool results
and documents), the tool calls a conversation replays (OpenAI `tool_calls[].function.arguments`,
Anthropic `tool_use.input`), the tool definitions (names, descriptions, schemas) and embedding
input. Tool definitions repeat across requests, so their verdict is memoised per text.

The scan is skipped when the class is already `confidential` or higher, since it could
not raise it further. The verdict keeps the detector kinds that fired, never the text.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.sensitive import find_sensitive
from routing_policies import DATA_CLASSES

__all__ = ["HEADER", "SCAN_FLOOR", "DataClassVerdict", "classify", "message_text", "tool_text", "user_hash"]

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
    found = {finding.kind for finding in find_sensitive(message_text(body))}
    definitions = tool_text(body)
    if definitions:
        found |= _kinds_memo(definitions) if len(definitions) <= _MEMO_MAX_CHARS else _kinds(definitions)
    kinds = tuple(sorted(found))
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
                _collect_calls(message, texts)
    value = body.get("input")
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        texts.extend(item for item in value if isinstance(item, str))
    return "\n".join(texts)


def tool_text(body: Mapping[str, Any]) -> str:
    """The tool definitions a model reads (OpenAI `tools` / legacy `functions`, Anthropic `tools`)."""
    parts = [value for key in ("tools", "functions") if isinstance(value := body.get(key), list) and value]
    return "\n".join(orjson.dumps(part).decode() for part in parts)


def _kinds(text: str) -> frozenset[str]:
    return frozenset(finding.kind for finding in find_sensitive(text))


_MEMO_MAX_CHARS = 32 * 1024
_kinds_memo = lru_cache(maxsize=256)(_kinds)  # bounded: 256 tool sets of at most 32 KB


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
            elif part.get("type") == "tool_use" and "input" in part:  # a replayed call's arguments
                texts.append(orjson.dumps(part["input"]).decode())
            elif part.get("type") == "document" and isinstance(source := part.get("source"), dict):
                if isinstance(source.get("data"), str) and source.get("type") == "text":
                    texts.append(source["data"])
                elif source.get("type") == "content":
                    _collect(source.get("content"), texts, depth + 1)


def _collect_calls(message: Mapping[str, Any], texts: list[str]) -> None:
    """OpenAI assistant tool calls (and the legacy `function_call`): their arguments are model input too."""
    calls = message.get("tool_calls")
    functions = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    functions.append(message.get("function_call"))
    for fn in functions:
        if isinstance(fn, dict) and (arguments := fn.get("arguments")) is not None:
            texts.append(arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode())
