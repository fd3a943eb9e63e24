"""Reading stripes from shared storage into the node's replica, each byte once.

Used by `loader_adapter.cluster.exchange.Exchange` for its own stripes and for the ones
it reads in place of a transfer that will not come.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence

from engine._reader_child import ASK_WINDOWS, MIN_ASK_BYTES, ask
from engine.adapt import MIN_READ_BYTES
from engine.mounts import DEFAULT_READ_AHEAD_BYTES, read_ahead_kb
from loader_adapter.cluster.plan import Stripe
from loader_adapter.cluster.replica import Replica

__all__ = ["StripeReader"]

#: The end of each stripe is read without read-ahead: this many read-ahead windows, at
#: least `_MIN_TAIL_BYTES` (see `StripeReader.read`).
_TAIL_WINDOWS = 2
_MIN_TAIL_BYTES = 256 << 10


class StripeReader:
    """Reads stripes of the checkpoint's files into a replica. Thread-safe.

    Args:
        sources: the checkpoint's files, in consumption order.
        replica: the node's replica.
        progress: called with each piece's bytes as it lands (the controller's rate).
    """

    def __init__(
        self,
        sources: Sequence[str],
        replica: Replica,
        progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.sources = list(sources)
        self.replica = replica
        self._progress = progress
        self._lock = threading.Lock()
        self._fds: dict[tuple[int, bool], int] = {}
        self._windows: dict[int, int] = {}

    def _fd(self, file: int, *, tail: bool = False) -> int:
        key = (file, tail)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = os.open(self.sources[file], os.O_RDONLY | os.O_CLOEXEC)
                if tail:  # read-ahead state is per open file: this one reads no further
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

    def _window(self, file: int) -> int:
        """The read-ahead window of `file`'s device (0: read-ahead is off)."""
        window = self._windows.get(file)
        if window is None:
            kb = read_ahead_kb(os.fstat(self._fd(file)).st_dev)
            window = self._windows[file] = DEFAULT_READ_AHEAD_BYTES if kb is None else kb << 10
        return window

    def read(self, s: Stripe) -> int:
        """Read a stripe from storage into the replica; return the bytes read.

        The kernel's read-ahead runs past the end of a read into the next stripe, which
        another node reads: those bytes leave storage twice (1.3% of the checkpoint on the
        simulated NFS). Without read-ahead one stream waits for each request in turn (half
        the speed). So the stripe's last read-ahead windows are read first through a
        descriptor without read-ahead (``POSIX_FADV_RANDOM``), then the rest with
        read-ahead, which then ends in bytes already cached. The other order does not work:
        the tail read meets the pages the first read marked for read-ahead, and read-ahead
        marks act whatever the descriptor's advice (measured: the same 1.3%).

        The rest is asked for ahead of the copy, `ASK_WINDOWS` read-ahead windows deep, as
        the node-local reader does (`engine._reader_child`): plain reads keep one window or
        two in flight, and on storage with a long round trip a stream is then slow however
        wide the link (the many-streams profile, 2 GiB, 2 simulated nodes: cluster mode
        11.8 s before, 6.8 s after; node-local mode 4.9-5.4 s). Asked pages carry no
        read-ahead mark, so nothing past the stripe is read.

        Raises:
            OSError: the read failed, or the file is shorter than planned.
        """
        window = self._window(s.file)
        tail = min(s.length, max(_TAIL_WINDOWS * window, _MIN_TAIL_BYTES))
        head = s.length - tail
        depth = ASK_WINDOWS * window if window >= MIN_ASK_BYTES else 0
        # The head's first asks go out before the tail is read, so that the tail's round
        # trip is not waited for alone (asked pages carry no mark for the tail read to meet).
        asked = s.offset + min(head, depth)
        if asked > s.offset:
            ask(self._fd(s.file), s.offset, asked - s.offset, window)
        n = self.replica.fill_from(s.file, s.offset + head, tail, self._fd(s.file, tail=True))
        self._progress(n)
        n += self._read_head(s, head, window, depth, asked)
        # The bytes now live in the replica: do not keep a second copy in the page cache.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd(s.file), s.offset, s.length, os.POSIX_FADV_DONTNEED)
        return n

    def _read_head(self, s: Stripe, head: int, window: int, depth: int, asked: int) -> int:
        """Copy the stripe's first `head` bytes, asked for `depth` bytes ahead of the copy
        (asked up to `asked` already)."""
        fd = self._fd(s.file)
        # Pieces of half the depth keep the asks between half a depth and a whole one
        # ahead; without asks, pieces of a read each: the controller measures the rate per
        # interval, and a whole stripe per count makes that rate jump in stripes.
        piece = max(window, depth // 2) if depth else MIN_READ_BYTES
        start, end = s.offset, s.offset + head
        pos = start
        while pos < end:
            upto = min(end, pos + depth)
            if depth and upto > asked:
                ask(fd, asked, upto - asked, window)
                asked = upto
            k = self.replica.fill_from(s.file, pos, min(piece, end - pos), fd)
            self._progress(k)
            pos += k
        return pos - start

    def close(self) -> None:
        """Close the source descriptors (idempotent)."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
