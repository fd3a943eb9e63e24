"""A read backend for tests: records calls, can block, fail or be slow, reads nothing."""

from __future__ import annotations

import errno
import threading
import time

from engine.backends import Backend


class FakeBackend(Backend):
    """Counts bytes 'read' per (fd's path, offset) without touching the disk.

    Args:
        fail: set of (path, offset) pairs that raise OSError(EIO).
        block: an Event; when given, every read waits until it is set.
        delay_s: sleep per read (to let the scheduler fill its in-flight slots).
    """

    name = "fake"
    description = "records calls"

    def __init__(
        self,
        *,
        fail: set[tuple[str, int]] | None = None,
        block: threading.Event | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.fail = fail or set()
        self.block = block
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int, int]] = []
        self.active = 0
        self.max_active = 0
        self.started = threading.Event()

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        import os

        path = os.readlink(f"/proc/self/fd/{fd}")
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append((path, offset, length))
        self.started.set()
        try:
            if self.block is not None:
                self.block.wait()
            if self.delay_s:
                time.sleep(self.delay_s)
            if (path, offset) in self.fail:
                raise OSError(errno.EIO, "injected I/O error")
            size = os.fstat(fd).st_size
            return max(0, min(length, size - offset))
        finally:
            with self.lock:
                self.active -= 1
