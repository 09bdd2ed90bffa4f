"""An SSE response that always closes its source, even when the client goes away.

Starlette's StreamingResponse can leave an async generator suspended at `yield` when
the client disconnects; the gateway needs the generator's `finally` (settle, audit,
cancel upstream) to run promptly, so this response closes it explicitly.

`DisconnectWatch` is the one task a streamed request gets: it waits for the client's
`http.disconnect` and cancels the serving task. The pipeline starts it before dispatch,
so a client that leaves while the upstream is still thinking (before the first content)
cancels the upstream call too; the response then keeps using it until the last byte.

A non-streamed request gets no task up front: most finish well within a second, and a task
each would cost more than the rest of their bookkeeping. `SlowCallWatch` (one sweeper task per
process) arms a `DisconnectWatch` for those whose upstream call has run for `after_s`, so a
client that leaves a long non-streamed request cancels its upstream call too (within about
`after_s` of the request's start, or at once when it leaves later than that).
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from typing import Any, Protocol, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class DisconnectWatch:
    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None = None) -> None:
        task = task or asyncio.current_task()  # the serving task, cancelled when the client leaves
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

    @property
    def cancel_lost(self) -> bool:
        """The client left, this watch cancelled the request, and the request goes on as if nothing
        happened: the CancelledError was swallowed on the way (asyncio.wait_for on Python 3.11 returns
        the result of a call that finished as the cancellation arrived; redis-py uses it for every
        command). Checked before the upstream call and between chunks, which then end the request."""
        return self._cancelled and not self.done

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


class _Watched(Protocol):
    watch: DisconnectWatch | None


class SlowCallWatch:
    """Watches non-streamed requests for a client disconnect once their upstream call runs long."""

    def __init__(self, after_s: float = 1.0) -> None:
        self.after_s = after_s
        self._calls: dict[int, tuple[float, _Watched, asyncio.Task[Any], Receive]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def during(self, ex: _Watched, receive: Receive, call: Awaitable[T]) -> T:
        """Await the upstream call; a client leaving once it has run `after_s` cancels it (CancelledError,
        which `ex.watch.absorb()` recognises, as for streams). Streams, watched from the start, pass through."""
        if ex.watch is not None:
            if ex.watch.cancel_lost:  # the client left during admission: no upstream call at all
                if isinstance(call, Coroutine):
                    call.close()
                raise asyncio.CancelledError
            return await call
        key = id(ex)
        task = asyncio.current_task()
        assert task is not None
        self._calls[key] = (time.monotonic(), ex, task, receive)
        if self._sweeper is None:
            self.start()
        try:
            return await call
        finally:
            del self._calls[key]
            if ex.watch is not None:  # armed meanwhile; the answer is in (or failed): a disconnect changes nothing now
                ex.watch.stop()

    def start(self) -> None:
        """The one sweeper task (Runtime.start; else the first watched call starts it)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="slow-call-watch", context=contextvars.Context())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.after_s / 5)
            if not self._calls:
                continue
            due = time.monotonic() - self.after_s
            for started, ex, task, receive in list(self._calls.values()):
                if started <= due and ex.watch is None:
                    ex.watch = DisconnectWatch(receive, task)

    @property
    def watching(self) -> int:
        """Calls tracked now (tests, metrics)."""
        return len(self._calls)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None


class RelayResponse:
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, watch: DisconnectWatch | None = None,
                 on_unstarted: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.watch = watch
        # Closing a generator that never started skips its `finally` (settle, audit, release):
        # when the client is gone (or the response start fails) before the first chunk, this runs instead.
        self.on_unstarted = on_unstarted

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw.append((b"content-type", b"text/event-stream; charset=utf-8"))
        return raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch or DisconnectWatch(receive)
        started = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self._raw_headers()})
            started = True  # the first __anext__ below runs the body up to its first await: its finally will run
            async for chunk in self.body:
                if watch.cancel_lost:
                    raise asyncio.CancelledError  # absorbed below; closing the body settles what was produced
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
            if not started and self.on_unstarted is not None:
                await self.on_unstarted()


#: What the request path returns: a plain response, or a relayed stream.
AnyResponse = Response | RelayResponse
