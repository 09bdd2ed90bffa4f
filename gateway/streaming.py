"""An SSE response that always closes its source, even when the client goes away.

Starlette's StreamingResponse can leave an async generator suspended at `yield` when
the client disconnects; the gateway needs the generator's `finally` (settle, audit,
cancel upstream) to run promptly, so this response closes it explicitly.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

from starlette.types import Receive, Scope, Send


class RelayResponse:
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = dict(headers or {})

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw.append((b"content-type", b"text/event-stream; charset=utf-8"))
        return raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        done = False

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not done:
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self._raw_headers()})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watcher.done() and not done:
                task.uncancel()  # the client left: not an error of ours
            else:
                raise
        finally:
            done = True
            watcher.cancel()
            if isinstance(self.body, AsyncGenerator):
                await self.body.aclose()
