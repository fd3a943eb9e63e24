"""Reading stripes from shared storage into the node's replica, each byte once.

Used by `loader_adapter.cluster.exchange.Exchange` for its own stripes and for the ones
it reads in place of a transfer that will not come.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence

from engine.adapt import MIN_READ_BYTES
from engine.mounts import read_ahead_bytes
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
        self._tails: dict[int, int] = {}

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

    def _tail_bytes(self, file: int) -> int:
        size = self._tails.get(file)
        if size is None:
            window = read_ahead_bytes(os.fstat(self._fd(file)).st_dev)
            size = self._tails[file] = max(_TAIL_WINDOWS * window, _MIN_TAIL_BYTES)
        return size

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

        Raises:
            OSError: the read failed, or the file is shorter than planned.
        """
        tail = min(s.length, self._tail_bytes(s.file))
        head = s.length - tail
        n = self.replica.fill_from(s.file, s.offset + head, tail, self._fd(s.file, tail=True))
        self._progress(n)
        # The head in pieces: the controller measures the rate per interval, and a whole
        # stripe per count makes that rate jump in stripes (noise it would not climb on).
        for off in range(0, head, MIN_READ_BYTES):
            k = self.replica.fill_from(
                s.file, s.offset + off, min(MIN_READ_BYTES, head - off), self._fd(s.file)
            )
            self._progress(k)
            n += k
        # The bytes now live in the replica: do not keep a second copy in the page cache.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd(s.file), s.offset, s.length, os.POSIX_FADV_DONTNEED)
        return n

    def close(self) -> None:
        """Close the source descriptors (idempotent)."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
