"""Reads in a helper process, so that a stalled server can never hold the serving process.

On a FUSE-based network filesystem client, a read the client daemon has taken sleeps
uninterruptibly until the server answers, and Linux ends a process only when every thread
has returned: a prefetch thread stuck there kept a serving process a zombie for over ten
minutes after `cancel()` (measured on sshfs whose server was stopped). `ReaderProcess`
moves every open and read of the prefetch into a small child process (`_reader_child`,
standard library only). The parent's threads only wait on pipes, which any signal or exit
interrupts. `abandon` drops the child without waiting: it exits by itself once its blocked
read returns, and the parent's death kills it.

Example:
    >>> r = ReaderProcess(threads=2)
    >>> r.submit("/etc/hostname", 0, 4096).result(10).warmed_bytes >= 0
    True
    >>> r.close()
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from engine import _reader_child as wire
from engine.procstat import process_cpu_s

__all__ = ["ReadResult", "ReaderGone", "ReaderProcess"]

log = logging.getLogger(__name__)
_CHILD = str(Path(wire.__file__).resolve())


class ReaderGone(OSError):
    """The reader process ended (abandoned, killed, or failed to start)."""


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What the reader process did with one range.

    Attributes:
        warmed_bytes: bytes read into the page cache (less than asked at end of file).
        cached_bytes: bytes found already cached and not read.
    """

    warmed_bytes: int
    cached_bytes: int


class ReaderProcess:
    """A child process that warms byte ranges into the page cache on request.

    Thread-safe: any thread may `submit`; results arrive as futures.

    Args:
        threads: reads the child runs at once.

    Raises:
        ReaderGone: the child could not be started.
    """

    def __init__(self, threads: int) -> None:
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _CHILD, str(max(1, threads))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # a Ctrl-C reaches the parent, which decides
            )
        except OSError as exc:
            raise ReaderGone(exc.errno, f"cannot start the reader process: {exc}") from exc
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future[ReadResult]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._replies = threading.Thread(
            target=self._read_replies, name="ckpt-prefetch-reader-replies", daemon=True
        )
        self._replies.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    def submit(
        self,
        path: str | os.PathLike[str],
        offset: int,
        length: int,
        *,
        skip_cached: bool = False,
        ahead_limit: int = 0,
    ) -> concurrent.futures.Future[ReadResult]:
        """Ask the child to warm [offset, offset + length) of `path`.

        Args:
            path: the file (opened by the child).
            offset: first byte.
            length: bytes to warm.
            skip_cached: answer "cached" without reading when every page is resident.
            ahead_limit: no local rank needs the bytes from this offset on (the end of a
                run of needed bytes): the kernel's read-ahead must not read past it (0:
                no limit).

        Returns:
            A future of the `ReadResult`; it fails with `OSError` (the read's errno) or
            `ReaderGone`.
        """
        fut: concurrent.futures.Future[ReadResult] = concurrent.futures.Future()
        raw = os.fsencode(path)
        flags = wire.FLAG_SKIP_CACHED if skip_cached else 0
        with self._lock:
            if self._closed:
                fut.set_exception(ReaderGone(0, "the reader process was closed"))
                return fut
            rid = next(self._ids)
            self._pending[rid] = fut
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(
                    wire.REQUEST.pack(rid, offset, length, ahead_limit, flags, len(raw))
                )
                self._proc.stdin.write(raw)
                self._proc.stdin.flush()
            except (OSError, ValueError) as exc:
                del self._pending[rid]
                fut.set_exception(ReaderGone(0, f"the reader process is gone: {exc}"))
        return fut

    def _read_replies(self) -> None:
        out = self._proc.stdout
        assert out is not None
        while len(data := out.read(wire.REPLY.size)) == wire.REPLY.size:
            rid, warmed, cached, code = wire.REPLY.unpack(data)
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None or fut.done():
                continue
            if code:
                fut.set_exception(OSError(code, os.strerror(code)))
            else:
                fut.set_result(ReadResult(warmed, cached))
        self._fail_pending("the reader process ended")

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ReaderGone(0, why))

    def cpu_s(self) -> float:
        """CPU seconds the child has used so far (0.0 once it is gone)."""
        return process_cpu_s(self._proc.pid)

    def abandon(self) -> None:
        """Stop at once: pending reads fail with `ReaderGone`; nothing waits for the child.

        The child sees its stdin end and exits as soon as no read of its own is blocked;
        a daemon thread reaps it whenever that is.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        except OSError as exc:  # a broken pipe: the child is gone already
            log.debug("closing the reader's stdin: %s", exc)
        self._fail_pending("the prefetch was stopped")
        threading.Thread(target=self._proc.wait, name="ckpt-prefetch-reaper", daemon=True).start()

    def close(self) -> None:
        """Stop taking requests and let the child exit (same as `abandon`)."""
        self.abandon()
