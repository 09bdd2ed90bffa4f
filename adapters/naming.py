"""Tool names and tool-call ids across formats: shortened or encoded reversibly.

Names: a provider rejects tool names longer than its limit or with other characters.
Such names are replaced by a deterministic short form (a readable prefix plus a hash),
and the answer's tool calls are mapped back with the table `name_table` returns, so the
client only ever sees its own names.

Ids: Anthropic wants `tool_use` ids of `[A-Za-z0-9_-]`; some OpenAI-compatible servers
produce others (or none). Those are base64url-encoded behind a prefix, so the id the
client later sends back in a tool result decodes to exactly the upstream's original.
"""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

# Longest tool name each target format accepts (both document ^[a-zA-Z0-9_-]{1,64}$).
NAME_LIMITS = {"openai": 64, "anthropic": 64}
_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_ID_PREFIX = "toolu_gw"


def short_name(name: str, limit: int) -> str:
    """`name` itself when the target accepts it, else a stable safe form of at most `limit` chars."""
    if 0 < len(name) <= limit and _SAFE.match(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    readable = _UNSAFE_CHAR.sub("_", name)[: limit - len(digest) - 1]
    return f"{readable}_{digest}"


def name_table(names: Iterable[str], target: str) -> dict[str, str]:
    """{short: original} for every name the target format would reject (empty when none)."""
    limit = NAME_LIMITS[target]
    table: dict[str, str] = {}
    for name in names:
        short = short_name(name, limit)
        if short != name:
            table[short] = name
    return table


def to_client_name(name: str, table: dict[str, str]) -> str:
    """Apply a `name_table` in the answer direction."""
    return table.get(name, name) if table else name


def anthropic_tool_id(call_id: str) -> str:
    """An id Anthropic accepts, reversible with `original_tool_id`."""
    if _SAFE.match(call_id) and not call_id.startswith(_ID_PREFIX):
        return call_id
    return _ID_PREFIX + base64.urlsafe_b64encode(call_id.encode()).decode().rstrip("=")


def original_tool_id(call_id: str) -> str:
    """Undo `anthropic_tool_id`; other ids are returned unchanged."""
    if not call_id.startswith(_ID_PREFIX):
        return call_id
    encoded = call_id[len(_ID_PREFIX):]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return call_id
