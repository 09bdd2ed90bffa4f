"""``limits``' in-process storage, tuned for the event loop (used by budgets/ratelimit.py)."""

from __future__ import annotations

import time

from limits.storage import MemoryStorage

__all__ = ["InlineExpiryMemoryStorage"]


class InlineExpiryMemoryStorage(MemoryStorage):
    """``limits``' memory storage without its expiry thread.

    Upstream arms a ``threading.Timer`` (a new OS thread) whenever a counter changes and the
    last one has fired, i.e. up to 100 thread starts a second under load, each competing with
    the event loop for the GIL. Reads already ignore expired counters (``get`` checks the
    expiry), so dropping them is only memory hygiene: done here inline, at most once a second.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timer.cancel()  # the one thread the base class starts: ended here, not left to linger
        self.timer.join()
        self._next_sweep = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # replaces the private thread-starting hook
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


# ``Storage.__init_subclass__`` wraps these methods (again, for every subclass) to turn backend
# errors into ``StorageError`` when ``wrap_exceptions`` is set, which this in-process storage
# never uses: take the plain functions, so a hit is not three nested wrappers deep.
for _name in ("incr", "get", "get_expiry", "check", "reset", "clear"):
    setattr(InlineExpiryMemoryStorage, _name, getattr(MemoryStorage, _name).__wrapped__)
