"""The one module that owns the upstream HTTP client (aiohttp, chosen by measurement).

Low-level client exceptions are mapped to `UpstreamError` here and nowhere else.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from adapters.base import UpstreamError, UpstreamRequest, UpstreamResponse, UpstreamStream

_MAX_ERROR_BODY = 64 * 1024


class UpstreamClient:
    """Pooled keep-alive connections to every provider, shared by all requests of a process."""

    def __init__(self, *, pool_size: int = 512, pool_per_host: int = 0) -> None:
        self._pool_size = pool_size
        self._pool_per_host = pool_per_host
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size,
            limit_per_host=self._pool_per_host,
            keepalive_timeout=60,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, total_s: float, connect_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=total_s)

    async def send(self, request: UpstreamRequest, *, timeout_s: float, connect_timeout_s: float) -> UpstreamResponse:
        """One request, whole answer read. Non-2xx answers raise UpstreamError(kind="status")."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.post(
                    request.url, data=request.body, headers=request.headers,
                    timeout=self._timeout(timeout_s, connect_timeout_s),
                ) as resp:
                    body = await resp.read()
                    headers = dict(resp.headers)
                    if resp.status >= 400:
                        raise status_error(resp.status, headers, body)
                    return UpstreamResponse(status=resp.status, headers=headers, body=body)
        except (UpstreamError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise map_exception(exc) from exc

    async def open_stream(self, request: UpstreamRequest, *, timeout_s: float, connect_timeout_s: float) -> UpstreamStream:
        """Send a request and return once the response headers are in; chunks come as they arrive."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._session.post(
                    request.url, data=request.body, headers=request.headers,
                    timeout=self._timeout(timeout_s, connect_timeout_s),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_exception(exc) from exc
        headers = dict(resp.headers)
        if resp.status >= 400:
            try:
                body = await resp.content.read(_MAX_ERROR_BODY)
            except Exception as exc:
                resp.close()
                raise map_exception(exc) from exc
            except asyncio.CancelledError:
                resp.close()
                raise
            resp.release()
            raise status_error(resp.status, headers, body)
        stream = UpstreamStream(status=resp.status, headers=headers, chunks=_iter_chunks(resp))
        stream._closers.append(resp.close)
        return stream


async def _iter_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        resp.close()
        raise
    except Exception as exc:
        resp.close()
        raise map_exception(exc) from exc
    finally:
        resp.release()


def status_error(status: int, headers: dict[str, str], body: bytes) -> UpstreamError:
    """An error status from a provider, with what retry logic needs (never shown to clients)."""
    code: str | None = None
    try:
        import orjson

        payload = orjson.loads(body) if body else None
        if isinstance(payload, dict):
            err = payload.get("error")
            if isinstance(err, dict):
                raw = err.get("code") or err.get("type")
                code = raw if isinstance(raw, str) else None
    except ValueError:
        code = None
    return UpstreamError(
        "status",
        status=status,
        retry_after_s=retry_after(headers),
        detail=body[:512].decode("utf-8", "replace"),
        code=code,
    )


def retry_after(headers: dict[str, str]) -> float | None:
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms:
        try:
            return float(raw_ms) / 1000.0
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw:
        try:
            return float(raw)
        except ValueError:
            return None
    return None


def map_exception(exc: Exception) -> Exception:
    """aiohttp/asyncio failures -> UpstreamError; cancellation passes through untouched."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamError("timeout", detail=type(exc).__name__)
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return UpstreamError("connect", detail=type(exc).__name__)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError)):
        return UpstreamError("closed", detail=type(exc).__name__)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return UpstreamError("connect", detail=type(exc).__name__)
    return exc
