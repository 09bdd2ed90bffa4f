"""A loopback TCP proxy that a test can cut and restore: a store outage without touching
the shared PostgreSQL/Redis other tests use. Runs its own event loop in a thread, so it
serves gateway processes and in-process clients alike.

``cut()`` refuses and resets connections (the store is down); ``stall()`` keeps every
connection open but relays nothing, in either direction (the store hangs: it accepts
connections and never answers). ``restore()`` ends either."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from tests.harness import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.resets = 0
        self.stalled = False  # read by the relay loops: while set, bytes are swallowed, never sent on
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def restore(self) -> None:
        """Accept connections again, and relay again after a stall."""
        self.stalled = False

        async def start() -> None:
            if self._server is None:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._run(start())

    def cut(self) -> None:
        """Refuse new connections and reset every open one: the store is 'down'."""
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        self._run(stop())

    def stall(self) -> None:
        """Blackhole: connections (open and new) stay up, but nothing reaches the other side.
        A connection that lost bytes this way is garbage afterwards; clients must drop it."""
        self.stalled = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stalled:  # accepted, never relayed: the handshake never completes
            self._writers.add(writer)
            try:
                while await reader.read(65536):
                    continue
            except (ConnectionError, OSError):
                self.resets += 1
            finally:
                writer.transport.abort()
                self._writers.discard(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.stalled:
                        continue  # swallowed: the other side waits for an answer that never comes
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                self.resets += 1  # the other side went away: close both below
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.cut()

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def url_for(self, url: str) -> str:
        """``url`` with its host:port replaced by this proxy's."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@contextmanager
def proxy_for(url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    try:
        yield proxy
    finally:
        proxy.close()
