"""What a rate-limit check is asked and what it answers: the per-minute caps, and the outcome
of one hit with the ``x-ratelimit-*`` headers it renders (budgets/ratelimit.py does the counting)."""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Caps per fixed minute; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def _duration(seconds: float) -> str:
    return f"{max(0, math.ceil(seconds))}s"


@dataclass(frozen=True, slots=True)
class RateState:
    """The outcome of one ``RateLimiter.hit``; ``*_tokens``/``*_requests`` are None when
    that limit is not configured. ``retry_after_s`` is set only when not allowed."""

    allowed: bool
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float | None
    retry_after_s: int | None
    #: When the token window this hit counted in ends (epoch s): where a refund must go.
    tokens_window_end: float | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI-style ``x-ratelimit-*`` headers for the configured limits (resets as "12s")."""
        headers: dict[str, str] = {}
        for kind, limit, remaining, reset in (
            (
                "requests",
                self.limit_requests,
                self.remaining_requests,
                self.reset_requests_s,
            ),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s),
        ):
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining or 0)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset or 0.0)
        return headers


UNLIMITED = RateState(True, None, None, None, None, None, None, None)


def reset_seconds(reset_at: float, now: float) -> float:
    """Seconds until a window that ends at ``reset_at`` resets; a full window when none is live."""
    return min(reset_at - now, WINDOW_S) if reset_at > now else WINDOW_S
