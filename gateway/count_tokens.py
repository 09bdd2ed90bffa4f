"""POST /v1/messages/count_tokens: how many input tokens a Messages request would use.

Exact from the provider when the routed model is Anthropic-type; otherwise (or when that
provider cannot answer) the gateway's offline count, which covers the system prompt,
every content block and the tool definitions, and is marked `x-gateway-token-count:
estimated`; for an Anthropic model that count is the upper bound (`tokens.upper_bound`), so
it never undercounts. Authenticated and routed like a request, audited, never billed, and
never mirrored to a route's shadow model.
"""
from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from adapters import anthropic as anthropic_adapter
from adapters.base import Endpoint, UpstreamError
from gateway.config import ModelConfig
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamRejected,
    render_error,
)
from gateway.parsing import ParsedRequest, read_body
from gateway.parsing_anthropic import parse_count_tokens
from gateway.pipeline import Exchange, authenticate, decide, request_id
from gateway.relay import finish_exchange
from gateway.runtime import Runtime

log = logging.getLogger("gateway.request")

# Upstream answers that mean "this request is wrong", as opposed to "this provider cannot answer now".
_REJECTIONS = frozenset({400, 413, 422})


async def count_tokens(rt: Runtime, request: Request) -> Response:
    ex = Exchange.begin(request_id(rt, request), "messages.count_tokens")
    rt.enter()
    try:
        if rt.draining:
            raise ServiceUnavailable("the gateway is shutting down", headers={"retry-after": "1"})
        raw = await read_body(request, rt.loaded.config.server.max_body_bytes)
        key, tenant = await authenticate(rt, request, ex)
        parsed = parse_count_tokens(raw, request.headers.get("anthropic-beta"))
        ex.note_request(parsed)
        decision = decide(rt, tenant, key, parsed, request, ex)
        model = rt.models[decision.candidates[0]]
        endpoint = rt.endpoints[model.provider]
        counted, exact = await _count(rt, model, endpoint, parsed, ex)
        headers = ex.response_headers()
        headers.update({"x-gateway-model": model.name, "x-gateway-provider": endpoint.provider,
                        "x-gateway-token-count": "exact" if exact else "estimated"})
        await finish_exchange(rt, ex, error=None)
        return Response(orjson.dumps({"input_tokens": counted}), headers=headers, media_type="application/json")
    except GatewayError as exc:
        await finish_exchange(rt, ex, error=exc)
        return render_error(exc, "anthropic", ex.response_headers())
    except BaseException:
        await finish_exchange(rt, ex, error=None, crashed=True)
        raise
    finally:
        rt.leave()


async def _count(rt: Runtime, model: ModelConfig, endpoint: Endpoint, parsed: ParsedRequest,
                 ex: Exchange) -> tuple[int, bool]:
    """(input tokens, exact?). Offline, an Anthropic model gets the upper bound: Claude's
    tokenizer splits text finer than cl100k, and a caller sizing a prompt must not be told less."""
    if endpoint.type != "anthropic":
        return parsed.input_tokens, False
    offline = parsed.input_tokens_bound
    upstream = anthropic_adapter.build_count_tokens_request(endpoint, parsed.body, model.upstream_model,
                                                            beta=parsed.anthropic_beta)
    try:
        answer = await rt.client.send(upstream, timeout_s=endpoint.timeout_s,
                                      connect_timeout_s=endpoint.connect_timeout_s)
    except UpstreamError as exc:
        if exc.kind == "status" and exc.status in _REJECTIONS:
            raise UpstreamRejected("the upstream model rejected the request", status=exc.status or 400) from None
        log.warning("count_tokens upstream failed; counting offline",
                    extra={"request_id": ex.request_id, "error": exc.kind, "status": exc.status})
        return offline, False
    try:
        payload = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        payload = None
    value = payload.get("input_tokens") if isinstance(payload, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, True
    return offline, False
