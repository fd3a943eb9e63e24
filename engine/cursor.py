"""The consumer position: how far the loader has read, on the plan's concatenated axis.

With a window, each local rank also publishes its position on a `RankBoard`, a small file
in shared memory, so that the prefetch drops only what the *slowest* rank has consumed:
ranks drift apart (measured: one of four ranks ran 460 MiB ahead of the others on a fast
filesystem, where the ranks are bound by 2 cores), and dropping behind a rank's own
position made the others read those bytes again (1.74x the checkpoint served).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from engine.errors import InvalidOptionError
from engine.plan import ResolvedFile
from engine.procstat import process_state

__all__ = ["ConsumerCursor", "RankBoard", "pid_alive"]

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (killed, not yet reaped by its parent) does not.

    Example:
        >>> pid_alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_state(pid) != "Z"  # unreadable (None): taken as alive


class RankBoard:
    """The consumer positions of the local ranks loading one checkpoint, in shared memory.

    One 64-byte slot per rank in ``/dev/shm/ckpt-prefetch-<uid>-<key>.board`` (the key
    hashes the world size and each file's device, inode and size, so every rank of a load
    finds the same file without talking to the others): pid, position, start and finish
    times (``CLOCK_MONOTONIC`` ns, the same clock in every process of the machine), the
    bytes the rank's prefetch has warmed and when its last read completed (the node's
    rate, for `engine.adapt`), and the reads in flight its adaptation chose, with whether
    it still decides (the node follows one rank's decisions: `pace_leader`). A rank
    registers when its prefetch plans, publishes its position as the loader advances, and
    marks itself finished at the end. The last rank to finish removes the file.

    `slowest` is conservative: a rank that has not registered, that died while loading, or
    whose slot was left finished by an earlier load (finished before this rank started) may
    still need everything, so it answers None and nothing is dropped.

    Example:
        >>> board = RankBoard.open([], 0, 1)  # doctest: +SKIP
        >>> board.publish(4096); board.slowest()  # doctest: +SKIP
        4096
    """

    # pid, position, started_ns, finished_ns, warmed, streams, pacing, warmed_ns
    _SLOT = struct.Struct("<qqqqqqqq")
    #: `pacing` values: this rank's run-time adaptation is deciding, or it has stopped.
    PACING, PACED = 1, 2

    def __init__(self, path: Path, rank: int, world: int) -> None:
        self.path = path
        self.rank = rank
        self.world = world
        size = world * self._SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{path} is not a regular file of this user")
            # Allocate, not just extend: on a full tmpfs a write to a page that has no
            # backing kills the process with SIGBUS, where fallocate fails with ENOSPC.
            os.posix_fallocate(fd, 0, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.started_ns = time.monotonic_ns()
        self._SLOT.pack_into(
            self._map, rank * self._SLOT.size, os.getpid(), 0, self.started_ns, 0, 0, 0, 0, 0
        )

    @classmethod
    def open(cls, files: Sequence[ResolvedFile], rank: int, world: int) -> RankBoard:
        """The board of this checkpoint and world size; raise OSError when it cannot be made."""
        ident = repr(("v3", world, [(f.dev, f.ino, f.size) for f in files])).encode()
        key = hashlib.sha256(ident).hexdigest()[:20]
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        return cls(base / f"ckpt-prefetch-{os.geteuid()}-{key}.board", rank, world)

    def _slot(self, r: int) -> tuple[int, ...]:
        assert self._map is not None
        return self._SLOT.unpack_from(self._map, r * self._SLOT.size)

    def publish(self, position: int) -> None:
        """Record this rank's position (bytes consumed on the checkpoint's axis)."""
        if self._map is not None:
            struct.pack_into("<q", self._map, self.rank * self._SLOT.size + 8, position)

    def publish_warmed(self, nbytes: int, at_ns: int | None = None) -> None:
        """Record the bytes this rank's prefetch has warmed so far, and when the last of
        them completed (``CLOCK_MONOTONIC`` ns; None: now)."""
        if self._map is not None:
            off = self.rank * self._SLOT.size
            struct.pack_into("<q", self._map, off + 32, nbytes)
            at = time.monotonic_ns() if at_ns is None else at_ns
            struct.pack_into("<q", self._map, off + 56, at)

    def warmed(self) -> tuple[int, ...]:
        """The bytes each rank's prefetch has warmed (a slot of an earlier load may linger:
        read differences, not totals)."""
        return tuple(b for b, _ in self.warmed_at())

    def warmed_at(self) -> tuple[tuple[int, int], ...]:
        """(bytes warmed, when the last of them completed in ns) of each rank."""
        if self._map is None:
            return ()
        return tuple((slot[4], slot[7]) for slot in map(self._slot, range(self.world)))

    def publish_streams(self, streams: int) -> None:
        """Record the reads in flight per rank this rank's adaptation chose, and that it is
        still deciding (the other ranks follow the lowest such rank: `pace_leader`)."""
        if self._map is not None:
            off = self.rank * self._SLOT.size
            struct.pack_into("<qq", self._map, off + 40, streams, self.PACING)

    def stop_pacing(self) -> None:
        """This rank's adaptation has stopped deciding (its prefetch ended)."""
        if self._map is not None:
            struct.pack_into("<q", self._map, self.rank * self._SLOT.size + 48, self.PACED)

    def pace_leader(self) -> tuple[int, int] | None:
        """(rank, streams) of the lowest rank whose adaptation is still deciding for the
        node, this one included; None when there is none (yet)."""
        if self._map is None:
            return None
        for r in range(self.world):
            pid, _, _, finished, _, streams, pacing, _ = self._slot(r)
            if pacing != self.PACING or finished or streams < 1:
                continue
            if r == self.rank or pid_alive(pid):
                return r, streams
        return None

    def slowest(self) -> int | None:
        """The smallest position of the ranks still loading; None when one may be unknown."""
        if self._map is None:
            return None
        low: int | None = None
        for r in range(self.world):
            pid, pos, _, finished, *_ = self._slot(r)
            if r != self.rank:
                if pid == 0:
                    return None  # not registered yet
                if finished:
                    if finished >= self.started_ns:
                        continue  # done with this load: needs nothing more
                    return None  # left by an earlier load: this load's rank has not started
                if not pid_alive(pid):
                    return None
            low = pos if low is None else min(low, pos)
        return low

    def finish(self) -> None:
        """Mark this rank finished; remove the file if no rank is still loading. Idempotent."""
        m, self._map = self._map, None
        if m is None:
            return
        off = self.rank * self._SLOT.size
        struct.pack_into("<q", m, off + 24, max(1, time.monotonic_ns()))
        try:
            slots = [self._SLOT.unpack_from(m, r * self._SLOT.size) for r in range(self.world)]
            if all(pid == 0 or fin or not pid_alive(pid) for pid, _, _, fin, *_ in slots):
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("could not remove %s: %s", self.path, exc)
        finally:
            m.close()


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
        # (path as given, resolved path, offset): the loader moves forward only
        self._latest: tuple[str, str, int] | None = None
        self._best = 0
        self._real: dict[str, str] = {}
        self._finished = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = []
        self._board: RankBoard | None = None
        self._board_starts: dict[str, int] = {}
        self._board_lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        """Move the position forward by `nbytes` on the concatenated axis."""
        if nbytes < 0:
            raise InvalidOptionError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            self._bytes += nbytes
        self._publish()
        self._wake()

    def advance_to(self, path: str | os.PathLike[str], offset: int) -> None:
        """Record that the loader has consumed file `path` up to byte `offset`."""
        if offset < 0:
            raise InvalidOptionError(f"offset must be >= 0, got {offset}")
        key = os.fspath(path)
        real = self._real.get(key)
        if real is None:  # on the caller's thread: a stalled server never blocks the loop
            real = self._real[key] = os.path.realpath(key)
        with self._lock:
            self._latest = (key, real, offset)
        self._publish()
        self._wake()

    def finish(self) -> None:
        """The loader is done: every extent's turn has passed."""
        with self._lock:
            self._finished = True
        with self._board_lock:
            board, self._board = self._board, None
            if board is not None:
                board.finish()
        self._wake(finished=True)

    def share(self, board: RankBoard, file_starts: dict[str, int]) -> None:
        """Publish the position on `board` from now on (given where each file starts)."""
        with self._board_lock:
            if self._finished:
                board.finish()
                return
            self._board, self._board_starts = board, file_starts
        weakref.finalize(self, board.finish)  # a cursor nobody finished: free the slot
        self._publish()

    def slowest(self, file_starts: dict[str, int]) -> int | None:
        """The slowest local rank's position: this rank's own without a board; None when
        the board cannot tell (see `RankBoard.slowest`)."""
        own = self.position(file_starts)
        with self._board_lock:
            if self._board is None:
                return None if self._finished else own
            other = self._board.slowest()
        return None if other is None else min(own, other)

    def _publish(self) -> None:
        if self._board is None:
            return
        with self._board_lock:
            if self._board is not None:
                self._board.publish(self.position(self._board_starts))

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
            path, real, offset = latest
            start = file_starts.get(path)
            if start is None:
                start = file_starts.get(real)
            if start is not None:
                best = max(best, start + offset)
        self._best = best
        return best

    def subscribe(self, event: asyncio.Event, *, moves: bool = True) -> None:
        """Set `event` (thread-safely, on its loop) when the loader finishes, and on every
        move of the position when `moves` (`wake_on_moves` changes that)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._waiters.append((loop, event, moves))

    def wake_on_moves(self, event: asyncio.Event, moves: bool) -> None:
        """Whether the position's moves set `event` (a finish always does).

        A wake costs the loader a write to the loop's pipe and the loop a decision: a
        scheduler that waits for reads, not for the loader, turns them off.
        """
        with self._lock:
            self._waiters = [(lp, ev, moves if ev is event else mv) for lp, ev, mv in self._waiters]

    def unsubscribe(self, event: asyncio.Event) -> None:
        """Stop waking `event`."""
        with self._lock:
            self._waiters = [w for w in self._waiters if w[1] is not event]

    def _wake(self, *, finished: bool = False) -> None:
        with self._lock:
            waiters = [(lp, ev) for lp, ev, moves in self._waiters if moves or finished]
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                pass
