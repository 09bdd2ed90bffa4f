"""What a client learns when an upstream refuses its request (a 4xx that is the caller's fault).

The status and, when it is one of the documented provider codes below, the error code are passed
on, so an SDK can branch on them (`err.code == "context_length_exceeded"`). The upstream's message
never is: it may echo the prompt. Each known code has a fixed message written here; anything else
is the gateway's own `invalid_request` with a generic message.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.base import UpstreamError
from gateway.errors import UpstreamRejected

__all__ = ["KNOWN_CODES", "KnownCode", "context_length_exceeded", "rejected"]


@dataclass(frozen=True)
class KnownCode:
    code: str  # what the client gets as `error.code`
    type: str  # and as `error.type` (OpenAI format; the Anthropic format's type follows the status)
    message: str


_BAD = "invalid_request_error"


def _known(*entries: tuple[str, str]) -> dict[str, KnownCode]:
    return {code: KnownCode(code, _BAD, f"the upstream model rejected the request ({code}): {what}")
            for code, what in entries}


KNOWN_CODES: dict[str, KnownCode] = {
    **_known(
        ("context_length_exceeded", "the request does not fit the model's context window"),
        ("string_above_max_length", "a string in the request is longer than the model accepts"),
        ("content_filter", "the provider's content filter refused the request"),
        ("content_policy_violation", "the provider's content policy refused the request"),
        ("invalid_prompt", "the provider refused the prompt"),
        ("unsupported_parameter", "a parameter is not supported by this model"),
        ("unsupported_value", "a parameter value is not supported by this model"),
        ("unknown_parameter", "the request has a parameter the model does not know"),
        ("missing_required_parameter", "a required parameter is missing"),
        ("invalid_value", "a parameter has a value the model does not accept"),
        ("invalid_type", "a parameter has the wrong type"),
        ("integer_above_max_value", "a number in the request is above the allowed maximum"),
        ("integer_below_min_value", "a number in the request is below the allowed minimum"),
        ("decimal_above_max_value", "a number in the request is above the allowed maximum"),
        ("decimal_below_min_value", "a number in the request is below the allowed minimum"),
        ("array_above_max_length", "a list in the request is longer than the model accepts"),
        ("empty_array", "a list in the request must not be empty"),
        ("invalid_image", "an image in the request could not be used"),
        ("invalid_image_format", "an image in the request has an unsupported format"),
        ("image_parse_error", "an image in the request could not be read"),
        ("invalid_image_url", "an image URL in the request could not be fetched"),
        ("image_too_large", "an image in the request is too large"),
    ),
    # Only an error type, no code (Anthropic's errors, OpenAI's without a code): the gateway's own code.
    _BAD: KnownCode("invalid_request", _BAD, "the upstream model rejected the request as invalid"),
}

_UNKNOWN = KnownCode("invalid_request", _BAD, "the upstream model rejected the request")


def rejected(exc: UpstreamError) -> UpstreamRejected:
    """The client's error for an upstream 4xx that is the caller's fault: its status, a known code or none."""
    known = KNOWN_CODES.get(exc.code or "", _UNKNOWN)
    return UpstreamRejected(known.message, status=exc.status or 400, code=known.code, type=known.type)


def context_length_exceeded() -> UpstreamRejected:
    """No candidate's context window fits the request (the upstream said so)."""
    known = KNOWN_CODES["context_length_exceeded"]
    return UpstreamRejected(known.message, status=400, code=known.code, type=known.type)
