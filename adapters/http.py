"""The one module that owns the upstream HTTP client (aiohttp, chosen by measurement).

Low-level client exceptions are mapped to `UpstreamError` here and nowhere else.

Timeouts (`Timeouts`, per attempt): `connect_s` bounds the TCP/TLS connect; `idle_s` the
gap between two reads of the answer (a stalled stream ends with an UpstreamError
"timeout"); `total_s` the whole attempt, body included (None: no cap). `first_byte_s`
bounds the wait for an answer: for `send` the whole answer, for streams the caller
applies it to "headers and the stream's first content" (gateway/dispatch.py), because
only that part can still fail over invisibly.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import aiohttp

from adapters.base import (
    Endpoint,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamStream,
)

_MAX_ERROR_BODY = 64 * 1024
ABORTED = "aborted by the gateway"  # the detail of the UpstreamError an aborted stream raises


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 60.0
    idle_s: float = 60.0
    total_s: float | None = None

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint) -> Timeouts:
        """A provider's timeouts: each unset one defaults to its `timeout_s`."""
        return cls(
            connect_s=endpoint.connect_timeout_s,
            first_byte_s=endpoint.first_byte_timeout_s or endpoint.timeout_s,
            idle_s=endpoint.idle_timeout_s or endpoint.timeout_s,
            total_s=endpoint.total_timeout_s,
        )

    def overridden(self, connect_s: float | None = None, first_byte_s: float | None = None,
                   idle_s: float | None = None, total_s: float | None = None) -> Timeouts:
        """These timeouts with a policy's overrides (None keeps the provider's value)."""
        return Timeouts(connect_s or self.connect_s, first_byte_s or self.first_byte_s, idle_s or self.idle_s,
                        total_s if total_s is not None else self.total_s)


class UpstreamClient:
    """Pooled keep-alive connections to every provider, shared by all requests of a process."""

    def __init__(self, *, pool_size: int = 512, pool_per_host: int = 0) -> None:
        self._pool_size = pool_size
        self._pool_per_host = pool_per_host
        self._session: aiohttp.ClientSession | None = None
        self._client_timeouts: dict[tuple[float | None, float, float], aiohttp.ClientTimeout] = {}

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

    @property
    def open_connections(self) -> int:
        """Connections to upstreams, busy or idle in the pool (for the soak check)."""
        connector = self._session.connector if self._session is not None else None
        if connector is None:
            return 0
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle + len(getattr(connector, "_acquired", ()))

    def _client_timeout(self, total_s: float | None, connect_s: float, idle_s: float) -> aiohttp.ClientTimeout:
        key = (total_s, connect_s, idle_s)
        found = self._client_timeouts.get(key)
        if found is None:
            found = self._client_timeouts[key] = aiohttp.ClientTimeout(
                total=total_s, sock_connect=connect_s, sock_read=idle_s)
        return found

    async def send(self, request: UpstreamRequest, *, timeouts: Timeouts | None = None,
                   timeout_s: float | None = None, connect_timeout_s: float | None = None) -> UpstreamResponse:
        """One request, whole answer read. Non-2xx answers raise UpstreamError(kind="status").

        `timeout_s`/`connect_timeout_s` (older callers) mean Timeouts(connect, first byte = idle = timeout_s)."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        t = timeouts or Timeouts(connect_timeout_s or 5.0, timeout_s or 60.0, timeout_s or 60.0)
        try:
            async with asyncio.timeout(t.total_s if t.total_s is not None else t.first_byte_s):
                async with self._session.post(
                    request.url, data=request.body, headers=request.headers,
                    timeout=self._client_timeout(None, t.connect_s, t.idle_s),
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

    async def open_stream(self, request: UpstreamRequest, *, timeouts: Timeouts | None = None,
                          timeout_s: float | None = None, connect_timeout_s: float | None = None) -> UpstreamStream:
        """Send a request and return once the response headers are in; chunks come as they arrive.

        The caller bounds the wait for headers (and first content) with `first_byte_s`."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        t = timeouts or Timeouts(connect_timeout_s or 5.0, timeout_s or 60.0, timeout_s or 60.0)
        try:
            resp = await self._session.post(
                request.url, data=request.body, headers=request.headers,
                timeout=self._client_timeout(t.total_s, t.connect_s, t.idle_s),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_exception(exc) from exc
        headers = dict(resp.headers)
        if resp.status >= 400:
            try:
                body = await resp.content.read(_MAX_ERROR_BODY)
            except asyncio.CancelledError:
                resp.close()
                raise
            except Exception as exc:
                resp.close()
                raise map_exception(exc) from exc
            resp.release()
            raise status_error(resp.status, headers, body)
        body_reader = _Body(resp)
        stream = UpstreamStream(status=resp.status, headers=headers, chunks=body_reader)
        stream._closers.append(body_reader.close)
        return stream


class _Body:
    """An upstream stream's chunks as they arrive. A class, not an async generator: one that is
    dropped unfinished must not leave a finaliser task behind (asyncio runs those as tasks)."""

    __slots__ = ("_aborted", "_content", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._content = resp.content
        self._aborted = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except asyncio.CancelledError:
            self._resp.close()
            raise
        except Exception as exc:
            self._resp.close()
            raise map_exception(exc) from exc
        if not chunk:
            self._resp.release()
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        """Give the connection back: kept for reuse when the answer was read to its end, else closed."""
        if self._content.is_eof() and not self._aborted:
            self._resp.release()
        else:
            self._resp.close()

    def abort(self) -> None:
        """End the stream now: a pending or later read raises UpstreamError("closed")."""
        self._aborted = True
        self._content.set_exception(UpstreamError("closed", detail=ABORTED))


# llama-cpp-python answers a request that fails its own (FastAPI) validation with 500 and
# FastAPI's validation text as the message, where other servers say 400 or 422. That is the
# caller's bad request, not an outage: it must not be retried nor sent to another provider.
_VALIDATION_500 = re.compile(r"\d+ validation errors?:\n\s*\{'type': '\w+', 'loc': \('body'")


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
                message = err.get("message")
                if status == 500 and isinstance(message, str) and _VALIDATION_500.match(message):
                    status, code = 400, "invalid_request_error"
    except ValueError:
        code = None
    return UpstreamError(
        "status",
        status=status,
        retry_after_s=retry_after(headers),
        detail=body[:512].decode("utf-8", "replace"),
        code=code,
    )


_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_TEXT = re.compile(r"context length|context window|context_length|prompt is too long|too many tokens|"
                           r"maximum context|exceeds the context|input is too long", re.IGNORECASE)
_NEEDED = re.compile(r"(?:resulted in|requested|prompt is too long:)\s*(\d+)\s*tokens", re.IGNORECASE)


def context_overflow(exc: UpstreamError) -> tuple[bool, int | None]:
    """(whether the upstream said the request does not fit the model's context window, and the
    token count it reported when it did). Read from the error code or the (never shown) detail."""
    if exc.kind != "status" or exc.status not in (400, 413, 422):
        return False, None
    if exc.code not in _CONTEXT_CODES and not _CONTEXT_TEXT.search(exc.detail):
        return False, None
    needed = _NEEDED.search(exc.detail)
    return True, int(needed.group(1)) if needed else None


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
