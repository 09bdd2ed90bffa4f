"""The HTTP edge: routes, lifespan, ops and admin endpoints."""
from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import pipeline
from gateway.errors import GatewayError, InvalidApiKey, InvalidRequest, NotFound, render_error
from gateway.parsing import load_json_object, parse_chat, parse_embeddings
from gateway.runtime import Runtime

log = logging.getLogger("gateway")


def create_app(rt: Runtime) -> HotPaths:
    async def chat_completions(request: Request) -> Response:
        return await pipeline.handle(rt, request, parse_chat, "chat.completions")

    async def embeddings(request: Request) -> Response:
        return await pipeline.handle(rt, request, parse_embeddings, "embeddings")

    async def list_models(request: Request) -> Response:
        try:
            key, tenant = await pipeline.authenticate(rt, request, pipeline.Exchange.begin(pipeline.request_id(rt, request), "models"))
        except GatewayError as exc:
            return render_error(exc, "openai")
        return JSONResponse({"object": "list", "data": _visible_models(rt, tenant.config.id)})

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
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "policies": sorted(rt.policies)})

    async def metrics(request: Request) -> Response:
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def admin_spend(request: Request) -> Response:
        _admin_only(rt, request)
        q = request.query_params
        group_by = [g for g in (q.get("by") or "tenant,model,day").split(",") if g]
        if not set(group_by) <= {"tenant", "model", "day"}:
            raise InvalidRequest("'by' must be a subset of tenant,model,day", param="by")
        rows = await rt.ledger.spend(
            _date(q.get("since"), "since"), _date(q.get("until"), "until"), q.get("tenant"), group_by
        )
        return Response(orjson.dumps({"data": [_spend_row(r) for r in rows]}), media_type="application/json")

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
        return JSONResponse({"key": key, **record.public()}, status_code=201)

    async def admin_revoke_key(request: Request) -> Response:
        _admin_only(rt, request)
        key_id = request.path_params["key_id"]
        if not await asyncio.to_thread(rt.key_admin.revoke, key_id):
            raise NotFound("no active key with that id")
        rt.keys.revoked_locally(key_id)
        return JSONResponse({"id": key_id, "revoked": True})

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return render_error(exc, "openai")

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
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/spend", admin_spend, methods=["GET"]),
        Route("/admin/keys", admin_create_key, methods=["POST"]),
        Route("/admin/keys/{key_id}", admin_revoke_key, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={GatewayError: on_error})
    return HotPaths(app, {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/embeddings"): embeddings})


class HotPaths:
    """Serves the proxied routes without Starlette's router and middleware layers.

    They are the hot path, already render every error themselves, and account for most
    of the gateway's CPU; everything else (and lifespan) goes through Starlette.
    """

    def __init__(self, app: Starlette, routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.routes.get((scope["method"], scope["path"]))
            if endpoint is not None:
                try:
                    response = await endpoint(Request(scope, receive))
                except Exception:
                    log.exception("unhandled error on the request path")
                    response = render_error(GatewayError("internal gateway error"), "openai")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


def _spend_row(row: object) -> dict[str, object]:
    data = dict(getattr(row, "group", {}))
    for attr in ("requests", "input_tokens", "output_tokens", "cached_input_tokens"):
        data[attr] = getattr(row, attr)
    data["cost_usd"] = str(getattr(row, "cost_usd"))
    return data


def _visible_models(rt: Runtime, tenant_id: str) -> list[dict[str, object]]:
    tenant = rt.tenants[tenant_id].config
    names = set(rt.models)
    policy = rt.policies.get(tenant.policy)
    if policy is not None:
        for route in policy.file.routes:
            model_when = route.when.model
            for alias in [model_when] if isinstance(model_when, str) else (model_when or []):
                if not any(ch in alias for ch in "*?["):
                    names.add(alias)
    visible = sorted(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in tenant.allowed_models))
    out: list[dict[str, object]] = []
    for name in visible:
        model = rt.models.get(name)
        candidate = rt.catalog.get(name)
        out.append({
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": model.provider if model else "gateway",
            "gateway": {
                "kind": "model" if model else "alias",
                "available": candidate.healthy if candidate else True,
            },
        })
    return out
