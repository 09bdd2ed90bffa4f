"""The HTTP edge: routes, lifespan, ops and admin endpoints."""
from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import admin_reports, pipeline, stores
from gateway.count_tokens import count_tokens
from gateway.dashboard import dashboard_routes
from gateway.errors import (
    ApiFormat,
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    render_error,
)
from gateway.explain import explain_live
from gateway.metrics import refresh as refresh_metrics
from gateway.parsing import load_json_object, parse_chat, parse_embeddings
from gateway.parsing_anthropic import parse_messages
from gateway.runtime import Runtime
from gateway.streaming import AnyResponse
from gateway.translation import anthropic_model_list

log = logging.getLogger("gateway")


def create_app(rt: Runtime) -> HotPaths:
    async def chat_completions(request: Request) -> AnyResponse:
        return await pipeline.handle(rt, request, parse_chat, "chat.completions")

    async def embeddings(request: Request) -> AnyResponse:
        return await pipeline.handle(rt, request, parse_embeddings, "embeddings")

    async def messages(request: Request) -> AnyResponse:
        beta = request.headers.get("anthropic-beta")
        return await pipeline.handle(rt, request, lambda raw: parse_messages(raw, beta), "messages", "anthropic")

    async def messages_count_tokens(request: Request) -> Response:
        return await count_tokens(rt, request)

    async def list_models(request: Request) -> Response:
        api: ApiFormat = "anthropic" if "anthropic-version" in request.headers else "openai"  # the Anthropic SDK sends it
        try:
            _key, tenant = await pipeline.authenticate(rt, request, pipeline.Exchange.begin(pipeline.request_id(rt, request), "models"))
        except GatewayError as exc:
            return render_error(exc, api)
        models = _visible_models(rt, tenant.config.id)
        if api == "anthropic":
            return JSONResponse(anthropic_model_list(models))
        return JSONResponse({"object": "list", "data": models})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        problems = []
        if not rt.started or rt.draining:
            problems.append("draining" if rt.draining else "starting")
        if not rt.policies:
            problems.append("no policies loaded")
        try:
            await asyncio.wait_for(asyncio.to_thread(rt.key_admin.list, "__readyz__"), timeout=2)
        except Exception as exc:  # noqa: BLE001 - any store failure means not ready
            problems.append(f"state store: {type(exc).__name__}")
        problems += await stores.store_problems(rt.ledger, rt.limiter)  # Redis/PostgreSQL: degraded
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "policies": sorted(rt.policies)})

    async def metrics(request: Request) -> Response:
        await refresh_metrics(rt, datetime.now(UTC))
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def admin_spend(request: Request) -> Response:
        return await admin_reports.admin_spend(rt, request)

    async def admin_audit(request: Request) -> Response:
        return await admin_reports.admin_audit(rt, request)

    async def admin_create_key(request: Request) -> Response:
        _admin_only(rt, request)
        body = load_json_object(await request.body())
        tenant = body.get("tenant")
        if not isinstance(tenant, str) or tenant not in rt.tenants:
            raise InvalidRequest("'tenant' must name a configured tenant", param="tenant")
        days = body.get("expires_in_days")
        if days is not None and (not isinstance(days, int) or days < 1):
            raise InvalidRequest("'expires_in_days' must be a positive integer", param="expires_in_days")
        key, record = await asyncio.to_thread(rt.key_admin.create, tenant, str(body.get("name") or ""), days)
        await rt.keys.refresh()
        rt.audit.admin("key.created", tenant=record.tenant, details={"key_id": record.id, "name": record.name})
        return JSONResponse({"key": key, **record.public()}, status_code=201)

    async def admin_revoke_key(request: Request) -> Response:
        _admin_only(rt, request)
        key_id = request.path_params["key_id"]
        if not await asyncio.to_thread(rt.key_admin.revoke, key_id):
            raise NotFound("no active key with that id")
        rt.keys.revoked_locally(key_id)
        rt.audit.admin("key.revoked", details={"key_id": key_id})
        return JSONResponse({"id": key_id, "revoked": True})

    async def admin_explain(request: Request) -> Response:
        _admin_only(rt, request)
        return Response(orjson.dumps(await explain_live(rt, load_json_object(await request.body()))),
                        media_type="application/json")

    async def admin_reload(request: Request) -> Response:
        _admin_only(rt, request)
        outcome = await rt.reloader.reload("admin")
        return JSONResponse(outcome.as_dict(), status_code=422 if outcome.result == "failure" else 200)

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return render_error(exc, api_of(request.url.path))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages_count_tokens, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/spend", admin_spend, methods=["GET"]),
        Route("/admin/audit", admin_audit, methods=["GET"]),
        *dashboard_routes(rt),
        Route("/admin/keys", admin_create_key, methods=["POST"]),
        Route("/admin/keys/{key_id}", admin_revoke_key, methods=["DELETE"]),
        Route("/admin/explain", admin_explain, methods=["POST"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={GatewayError: on_error})
    return HotPaths(app, {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/embeddings"): embeddings,
                          ("POST", "/v1/messages"): messages,
                          ("POST", "/v1/messages/count_tokens"): messages_count_tokens})


def api_of(path: str) -> ApiFormat:
    """The error format a route's callers read: Anthropic's under /v1/messages, else OpenAI's."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


class HotPaths:
    """Serves the proxied routes without Starlette's router and middleware layers.

    They are the hot path, already render every error themselves, and account for most
    of the gateway's CPU; everything else (and lifespan) goes through Starlette.
    """

    def __init__(self, app: Starlette, routes: dict[tuple[str, str], Callable[[Request], Awaitable[AnyResponse]]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.routes.get((scope["method"], scope["path"]))
            if endpoint is not None:
                request = Request(scope, receive)
                request._headers = IndexedHeaders(scope=scope)  # what request.headers returns from now on
                try:
                    response = await endpoint(request)
                except Exception:
                    log.exception("unhandled error on the request path")
                    response = render_error(GatewayError("internal gateway error"), api_of(scope["path"]))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class IndexedHeaders(Headers):
    """Starlette's request headers with O(1) lookups: the request path reads about ten of them,
    and `Headers.get` scans and decodes the whole list each time. First value wins, as in Headers."""

    def __init__(self, *, scope: Scope) -> None:
        super().__init__(scope=scope)
        index: dict[bytes, bytes] = {}
        for name, value in self._list:
            index.setdefault(name, value)
        self._index = index

    def get(self, key: str, default: Any = None) -> Any:
        value = self._index.get(key.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def __getitem__(self, key: str) -> str:
        value = self._index.get(key.lower().encode("latin-1"))
        if value is None:
            raise KeyError(key)
        return value.decode("latin-1")

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower().encode("latin-1") in self._index


def _admin_only(rt: Runtime, request: Request) -> None:
    presented = pipeline.presented_key(request)
    if not rt.admin_key or not presented or not hmac.compare_digest(presented.encode(), rt.admin_key.encode()):
        raise InvalidApiKey("admin routes need the admin key")


def _date(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO date (YYYY-MM-DD)", param=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=__import__("datetime").UTC)


def _visible_models(rt: Runtime, tenant_id: str) -> list[dict[str, object]]:
    from gateway.config import alias_candidates, alias_unavailable_reason

    tenant = rt.tenants[tenant_id].config
    policy = rt.policies.get(tenant.policy)
    aliases = alias_candidates(policy) if policy is not None else {}
    names = set(rt.models) | set(aliases)
    visible = sorted(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in tenant.allowed_models))
    unavailable: dict[str, str] = {}  # model -> why: its provider's key unset, or its health check down
    for name, candidate in rt.catalog.items():
        if not candidate.healthy:
            health = rt.health.states.get(candidate.provider)
            unavailable[name] = (rt.loaded.providers[candidate.provider].unavailable_reason()
                                 or (f"health check {health.describe()}" if health and not health.healthy
                                     else "unhealthy"))
    out: list[dict[str, object]] = []
    for name in visible:
        model = rt.models.get(name)
        reason = unavailable.get(name) if model else alias_unavailable_reason(aliases.get(name, []), unavailable)
        meta: dict[str, object] = {"kind": "model" if model else "alias", "available": reason is None}
        if reason is not None:
            meta["reason"] = reason
        out.append({"id": name, "object": "model", "created": 0,
                    "owned_by": model.provider if model else "gateway", "gateway": meta})
    return out
