"""Server-sent events: split a byte stream into events as it arrives, read their fields."""
from __future__ import annotations


class SseSplitter:
    """Feed raw bytes, get back every complete event (without its blank-line terminator)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2:]
        return [event for event in buffer[:end].split(b"\n\n") if event.strip()]

    def flush(self) -> list[bytes]:
        """The trailing event when the stream ends without a blank line."""
        rest, self._buffer = self._buffer.strip(b"\n"), b""
        return [rest] if rest.strip() else []


def event_fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one SSE event; multi-line data is joined with newlines."""
    name: bytes | None = None
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, (b"\n".join(data) if data else None)
