"""The consumer position: how far the loader has read, on the plan's concatenated axis."""

from __future__ import annotations

import asyncio
import os
import threading

__all__ = ["ConsumerCursor"]


class ConsumerCursor:
    """A thread-safe, monotonic record of the loader's progress through the checkpoint.

    The loader reports either a byte count on the concatenated axis (`advance`) or a file
    and an offset in it (`advance_to`); the scheduler converts the latter once it knows
    where each file starts. Waiters (the scheduler's event loops) are woken on each change.

    Example:
        >>> c = ConsumerCursor()
        >>> c.advance(100)
        >>> c.position({})
        100
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0
        self._latest: tuple[str, int] | None = None  # the loader moves forward only
        self._best = 0
        self._real: dict[str, str] = {}
        self._finished = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def advance(self, nbytes: int) -> None:
        """Move the position forward by `nbytes` on the concatenated axis."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            self._bytes += nbytes
        self._wake()

    def advance_to(self, path: str | os.PathLike[str], offset: int) -> None:
        """Record that the loader has consumed file `path` up to byte `offset`."""
        key = os.fspath(path)
        with self._lock:
            self._latest = (key, offset)
        self._wake()

    def finish(self) -> None:
        """The loader is done: every extent's turn has passed."""
        with self._lock:
            self._finished = True
        self._wake()

    @property
    def finished(self) -> bool:
        """Whether `finish` was called."""
        return self._finished

    def position(self, file_starts: dict[str, int]) -> int:
        """The consumer position, given where each (resolved) file starts on the axis."""
        with self._lock:
            latest = self._latest
            best = max(self._best, self._bytes)
        if latest is not None:
            path, offset = latest
            start = file_starts.get(path)
            if start is None:
                real = self._real.get(path)
                if real is None:
                    real = self._real[path] = os.path.realpath(path)
                start = file_starts.get(real)
            if start is not None:
                best = max(best, start + offset)
        self._best = best
        return best

    def subscribe(self, event: asyncio.Event) -> None:
        """Set `event` (thread-safely, on its loop) whenever the position changes."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._waiters.append((loop, event))

    def unsubscribe(self, event: asyncio.Event) -> None:
        """Stop waking `event`."""
        with self._lock:
            self._waiters = [(lp, ev) for lp, ev in self._waiters if ev is not event]

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                pass
