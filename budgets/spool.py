"""A local, append-only spool for writes a shared store could not take right now.

Each process appends JSON lines to its own file ``<dir>/<name>-<pid>-<random>.jsonl``
and holds an exclusive ``flock`` on it while alive. When everything spooled has reached
the store, the file is truncated. A file whose lock can be taken belongs to a process
that died: ``adopt_orphans`` moves its lines into this process's file, so they are
replayed exactly like our own. Replays are idempotent at the store (primary keys), so a
line replayed twice records nothing twice. Writes are rare (only while a store is down)
and go through a worker thread, never blocking the event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO

__all__ = ["Spool"]

log = logging.getLogger("budgets.spool")


class Spool:
    def __init__(self, directory: str | Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / f"{name}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._file: BinaryIO | None = None
        self._lock = asyncio.Lock()
        self.lines = 0  # lines in our file since it was last cleared

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")  # noqa: SIM115 - held open for the process lifetime
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file = handle

    async def append(self, lines: list[bytes]) -> None:
        """Append and fsync ``lines`` (each one JSON document, no newline)."""
        if not lines:
            return
        async with self._lock:
            await asyncio.to_thread(self._append, lines)
            self.lines += len(lines)

    def _append(self, lines: list[bytes]) -> None:
        assert self._file is not None, "spool is not open"
        self._file.write(b"".join(line + b"\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    async def clear(self) -> None:
        """Everything spooled so far has reached the store: empty the file."""
        async with self._lock:
            if self.lines:
                await asyncio.to_thread(self._truncate)
                self.lines = 0

    def _truncate(self) -> None:
        assert self._file is not None
        self._file.truncate(0)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def adopt_orphans(self) -> list[bytes]:
        """Take over the files of dead processes; returns their lines (now also in ours)."""
        async with self._lock:
            lines = await asyncio.to_thread(self._adopt)
            self.lines += len(lines)
            return lines

    def _adopt(self) -> list[bytes]:
        adopted: list[bytes] = []
        for path in sorted(self.directory.glob(f"{self.name}-*.jsonl")):
            if path == self.path:
                continue
            try:
                handle = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                continue
            with handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive
                lines = [line for line in handle.read().splitlines() if line.strip()]
                if lines:
                    self._append(lines)
                    adopted.extend(lines)
                path.unlink(missing_ok=True)
        if adopted:
            log.warning(
                "adopted spooled writes of a stopped process",
                extra={"spool": self.name, "lines": len(adopted)},
            )
        return adopted

    async def close(self) -> None:
        """Release the file; an empty one is removed, a non-empty one stays for replay."""
        async with self._lock:
            if self._file is None:
                return
            handle, self._file = self._file, None
            await asyncio.to_thread(self._close, handle, self.lines == 0)

    def _close(self, handle: BinaryIO, empty: bool) -> None:
        if empty:
            self.path.unlink(missing_ok=True)
        handle.close()
