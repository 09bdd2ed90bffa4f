"""Typed gateway errors, rendered once at the edge in the caller's format.

Messages are fixed text chosen here: never an upstream body, a key or a prompt.
"""
from __future__ import annotations

from typing import Literal

import orjson
from starlette.responses import Response

ApiFormat = Literal["openai", "anthropic"]

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


class GatewayError(Exception):
    status = 500
    code = "internal_error"
    type = "api_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


class InvalidRequest(GatewayError):
    status, code, type = 400, "invalid_request", "invalid_request_error"


class InvalidApiKey(GatewayError):
    status, code, type = 401, "invalid_api_key", "invalid_request_error"


class ModelNotAllowed(GatewayError):
    status, code, type = 403, "model_not_allowed", "permission_error"


class ModelNotFound(GatewayError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


class RequestTooLarge(GatewayError):
    status, code, type = 413, "request_too_large", "invalid_request_error"


class RateLimited(GatewayError):
    status, code, type = 429, "rate_limit_exceeded", "rate_limit_error"


class BudgetExhausted(GatewayError):
    status, code, type = 429, "budget_exceeded", "insufficient_quota"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "x-should-retry": "false"})


class UpstreamFailed(GatewayError):
    status, code, type = 502, "upstream_error", "api_error"

    def __init__(self, message: str, *, status: int = 502, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "x-should-retry": "false"})
        self.status = status


class UpstreamRejected(GatewayError):
    """The upstream refused the request itself (4xx other than auth/quota): the caller's fault."""

    status, code, type = 400, "invalid_request", "invalid_request_error"

    def __init__(self, message: str, *, status: int = 400, headers: dict[str, str] | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "x-should-retry": "false"})
        self.status = status
        if code is not None:  # a known provider code passed on (gateway/upstream_errors.py)
            self.code = code
        if type is not None:
            self.type = type


class ServiceUnavailable(GatewayError):
    status, code, type = 503, "service_unavailable", "api_error"


class NotFound(GatewayError):
    status, code, type = 404, "not_found", "invalid_request_error"


def error_body(exc: GatewayError, api: ApiFormat) -> bytes:
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(exc.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}})
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    )


def render_error(exc: GatewayError, api: ApiFormat, extra_headers: dict[str, str] | None = None) -> Response:
    headers = {**(extra_headers or {}), **exc.headers}
    return Response(error_body(exc, api), status_code=exc.status, headers=headers, media_type="application/json")
