"""An SSE response that always closes its source, even when the client goes away.

Starlette's StreamingResponse can leave an async generator suspended at `yield` when
the client disconnects; the gateway needs the generator's `finally` (settle, audit,
cancel upstream) to run promptly, so this response closes it explicitly.

`DisconnectWatch` is the one task a streamed request gets: it waits for the client's
`http.disconnect` and cancels the serving task. The pipeline starts it before dispatch,
so a client that leaves while the upstream is still thinking (before the first content)
cancels the upstream call too; the response then keeps using it until the last byte.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class DisconnectWatch:
    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.gone = False  # the client disconnected
        self.done = False  # the answer is complete: a disconnect now changes nothing
        self._cancelled = False
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if not self.done:
                    self._cancelled = True
                    self._task.cancel()
                return

    def absorb(self) -> bool:
        """After a CancelledError: True (and the task uncancelled) when it was this watch's doing."""
        if self.gone and self._cancelled:
            self._cancelled = False
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        self.done = True
        self._watcher.cancel()


class RelayResponse:
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, watch: DisconnectWatch | None = None) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.watch = watch

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw.append((b"content-type", b"text/event-stream; charset=utf-8"))
        return raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch or DisconnectWatch(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self._raw_headers()})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watch.done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.absorb():  # the client left: not an error of ours
                raise
        finally:
            watch.stop()
            if isinstance(self.body, AsyncGenerator):
                await self.body.aclose()


#: What the request path returns: a plain response, or a relayed stream.
AnyResponse = Response | RelayResponse
