"""The node-local replica: where bytes received from other nodes live. No torch.

A node cannot put bytes into the page cache of a file on a network filesystem without
reading them from that filesystem. So in cluster mode each node keeps a *replica* of the
checkpoint: one sparse file per checkpoint file, the same size, in a directory of its own
(on ``/dev/shm`` by default, or on a local disk the user names). Stripes the node's ranks
read from storage and stripes received from other nodes are written into it through a
shared mapping, and the loader reads the replica's files instead of the originals.

Next to the files, a small *map* (``ready.map``) in the same directory holds:

* one state byte per stripe (`StripeState`), so that the loader never yields a tensor
  before all its bytes are there, and knows when a stripe will not arrive;
* one slot per local rank (pid, consumer position, finished, failed), the model of
  `engine.cursor.RankBoard`: the window follows the slowest local rank, and a rank that
  died is seen by the others.

Every local rank opens the same directory (its name is agreed by the job, see
`loader_adapter.cluster`), holds a shared ``flock`` on ``.lock`` while it uses it, and the
last one to leave removes the directory. A directory whose lock nobody holds is stale
(a killed job) and is removed by the next replica opened in the same place.

Writers of a stripe always write the original bytes, so two writers of one stripe (a
late receive and a fallback read, say) are harmless; the state changes are plain byte
stores, and the few races between them cost at most a redundant read.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine import _libc
from engine.cursor import pid_alive as _alive
from engine.errors import InvalidOptionError

__all__ = ["READY_STATES", "LocalRanks", "Replica", "StripeState", "sweep_stale"]

log = logging.getLogger(__name__)

_MAGIC = b"CKPTREP1"
_HEADER = struct.Struct("<8sqq")  # magic, stripes, local world
_SLOT = struct.Struct("<qqqqq")  # pid, position, started_ns, finished_ns, failed
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: Fill claims are fcntl locks on bytes of the map file past this offset (past its end).
_CLAIM_BASE = 1 << 40
#: A replica directory younger than this is never taken for stale.
STALE_AFTER_S = 60.0

_fallocate = _libc.libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class StripeState(enum.IntEnum):
    """Where one stripe of one node's replica stands."""

    #: Not here yet.
    EMPTY = 0
    #: Here; its reader still sends it to other nodes (not to be freed yet).
    SENDING = 1
    #: Here.
    READY = 2
    #: Will not arrive through the exchange (its sender failed): read it from storage here.
    ORPHAN = 3
    #: Consumed by every local rank and freed (window only).
    PUNCHED = 4


#: States in which a stripe's bytes are in the replica.
READY_STATES = frozenset({StripeState.SENDING, StripeState.READY})


def sweep_stale(base: Path, prefix: str, *, keep: Path | None = None) -> int:
    """Remove replica directories under `base` named ``prefix*`` that nobody uses.

    A directory is stale when it is older than `STALE_AFTER_S` and an exclusive ``flock``
    on its ``.lock`` succeeds (every rank that used it holds a shared one until it leaves;
    locks die with their processes).

    Returns:
        The number of directories removed.
    """
    removed = 0
    try:
        entries = list(base.glob(prefix + "*.replica"))
    except OSError:
        return 0
    now = time.time()
    for d in entries:
        if keep is not None and d == keep:
            continue
        try:
            if now - d.stat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(d / ".lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
            log.info("removed stale replica %s", d)
        finally:
            os.close(fd)
    return removed


class LocalRanks:
    """The local ranks' slots of a replica's map (pid, consumer position, finished, failed):
    the model of `engine.cursor.RankBoard`. The window follows the slowest local rank, and
    a rank that died is seen by the others. Use `Replica.ranks`.

    Args:
        map_: the replica's map; base: the offset of slot 0 in it.
        local_rank: this process's local rank; local_world: the node's local ranks.
        started_ns: when this rank registered (``time.monotonic_ns``).
    """

    def __init__(
        self, map_: mmap.mmap, base: int, local_rank: int, local_world: int, started_ns: int
    ) -> None:
        self._map = map_
        self._base = base
        self.local_rank = local_rank
        self.local_world = local_world
        self.started_ns = started_ns
        self.closed = False
        _SLOT.pack_into(map_, self._offset(local_rank), os.getpid(), 0, started_ns, 0, 0)

    def _offset(self, local_rank: int) -> int:
        return self._base + local_rank * _SLOT.size

    def _slot(self, local_rank: int) -> tuple[int, int, int, int, int]:
        return _SLOT.unpack_from(self._map, self._offset(local_rank))

    def publish(self, position: int) -> None:
        """Record this rank's consumer position (bytes consumed on the concatenated axis)."""
        if not self.closed:
            struct.pack_into("<q", self._map, self._offset(self.local_rank) + 8, position)

    def finish_consuming(self) -> None:
        """This rank's loader is done: it needs no more bytes of the replica."""
        if not self.closed:
            off = self._offset(self.local_rank) + 24
            struct.pack_into("<q", self._map, off, max(1, time.monotonic_ns()))

    def mark_failed(self, local_rank: int) -> None:
        """Record that `local_rank` is not to be waited for any more (it stalled)."""
        struct.pack_into("<q", self._map, self._offset(local_rank) + 32, 1)

    def rank_alive(self, local_rank: int, *, grace_s: float) -> bool:
        """Whether `local_rank` runs and was not marked failed.

        A rank that has not registered yet counts as alive for `grace_s` after this one
        registered (local ranks start at different times), then as gone.
        """
        pid, _, _, _, failed = self._slot(local_rank)
        if pid == 0:
            return time.monotonic_ns() - self.started_ns <= grace_s * 1e9
        return not failed and _alive(pid)

    def slowest(self, *, grace_s: float, include_failed: bool = False) -> int | None:
        """The smallest position of the local ranks still consuming; None when none is.

        A rank that has not registered counts as position 0 for `grace_s` after this one
        registered, then as gone; a rank that died counts as gone, and so does one marked
        failed unless `include_failed` (a stalled rank may come back and read on).
        """
        low: int | None = None
        late = time.monotonic_ns() - self.started_ns > grace_s * 1e9
        for r in range(self.local_world):
            pid, pos, _, finished, failed = self._slot(r)
            if pid == 0:
                if late:
                    continue
                pos = 0
            elif finished or (failed and not include_failed) or not _alive(pid):
                continue
            low = pos if low is None else min(low, pos)
        return low


class Replica:
    """One node's replica of a checkpoint, opened by one local rank.

    Use `Replica.open`; `close` when done (the last local rank removes the directory).

    Attributes:
        directory: the replica's directory.
        paths: the replica file of each checkpoint file, in consumption order.
        local_rank: this process's local rank.
        local_world: number of local ranks using the replica.
    """

    def __init__(
        self,
        directory: Path,
        names: Sequence[str],
        sizes: Sequence[int],
        stripes: int,
        local_rank: int,
        local_world: int,
    ) -> None:
        if len(names) != len(sizes):
            raise InvalidOptionError("names and sizes differ in length")
        if not 0 <= local_rank < local_world:
            raise InvalidOptionError(f"need 0 <= local_rank < local_world, got {local_rank}")
        self.directory = directory
        self.local_rank = local_rank
        self.local_world = local_world
        self.sizes = tuple(int(s) for s in sizes)
        self.paths = [directory / f"{i:05d}-{os.path.basename(n)}" for i, n in enumerate(names)]
        self._stripes = stripes
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self._fds: list[int] = []
        self._maps: list[mmap.mmap | None] = []
        self._closed = False
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._alive_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._alive_fd, fcntl.LOCK_SH)
        try:
            self._map_fd, self._map = self._open_map()
            for path, size in zip(self.paths, self.sizes, strict=True):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._fds.append(fd)
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)  # sparse: no block is allocated
                self._maps.append(mmap.mmap(fd, size) if size else None)
        except BaseException:
            self.close()
            raise
        #: The local ranks' slots: positions, liveness (`LocalRanks`).
        self.ranks = LocalRanks(
            self._map, _HEADER.size, local_rank, local_world, time.monotonic_ns()
        )

    @classmethod
    def open(
        cls,
        base: str | os.PathLike[str],
        name: str,
        names: Sequence[str],
        sizes: Sequence[int],
        stripes: int,
        local_rank: int,
        local_world: int,
    ) -> Replica:
        """Open (creating if needed) the replica directory ``base/name.replica``.

        Stale replicas of earlier jobs with the same name prefix up to the last ``-`` are
        removed first (see `sweep_stale`).

        Args:
            base: the directory that holds replicas (``/dev/shm`` or a local disk).
            name: the replica's name, the same on every local rank of this load.
            names: base names of the checkpoint files, in consumption order.
            sizes: their sizes.
            stripes: number of stripes in the cluster plan.
            local_rank: this process's local rank.
            local_world: number of local ranks.

        Raises:
            OSError: the directory or its files cannot be made (no room, no permission).
        """
        base = Path(base)
        directory = base / f"{name}.replica"
        sweep_stale(base, name.rsplit("-", 2)[0], keep=directory)
        return cls(directory, names, sizes, stripes, local_rank, local_world)

    # ------------------------------------------------------------------ the map
    def _open_map(self) -> tuple[int, mmap.mmap]:
        size = _HEADER.size + self.local_world * _SLOT.size + self._stripes
        fd = os.open(self.directory / "ready.map", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Allocate, not just extend: a store to an unbacked tmpfs page is a SIGBUS.
            os.posix_fallocate(fd, 0, size)
            m = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        magic, stripes, world = _HEADER.unpack_from(m, 0)
        if magic == b"\0" * 8:
            _HEADER.pack_into(m, 0, _MAGIC, self._stripes, self.local_world)
        elif (magic, stripes, world) != (_MAGIC, self._stripes, self.local_world):
            m.close()
            os.close(fd)
            raise OSError(errno.EEXIST, f"{self.directory} holds a different replica")
        return fd, m

    def _state_offset(self, stripe: int) -> int:
        return _HEADER.size + self.local_world * _SLOT.size + stripe

    def state(self, stripe: int) -> StripeState:
        """The stripe's state in this node's replica."""
        return StripeState(self._map[self._state_offset(stripe)])

    def ready(self, stripe: int) -> bool:
        """Whether the stripe's bytes are in the replica."""
        return self._map[self._state_offset(stripe)] in READY_STATES

    def set_state(
        self, stripe: int, state: StripeState, *, only_from: frozenset[int] | None = None
    ) -> bool:
        """Set the stripe's state (if its state is one of `only_from`, when given).

        Returns:
            Whether the state was set.
        """
        off = self._state_offset(stripe)
        with self._lock:
            if only_from is not None and self._map[off] not in only_from:
                return False
            self._map[off] = int(state)
        return True

    # ------------------------------------------------------------------- bytes
    def view(self, file: int, offset: int, length: int) -> memoryview:
        """A writable view of ``[offset, offset + length)`` of replica file `file`."""
        m = self._maps[file]
        if m is None or offset < 0 or offset + length > self.sizes[file]:
            raise InvalidOptionError(f"range [{offset}, {offset + length}) outside file {file}")
        return memoryview(m)[offset : offset + length]

    def allocate(self, file: int, offset: int, length: int) -> None:
        """Give the range backing store first: on a full tmpfs a store is a SIGBUS, this is
        an ENOSPC (`OSError`)."""
        if length:
            os.posix_fallocate(self._fds[file], offset, length)

    def fill_from(self, file: int, offset: int, length: int, src_fd: int) -> int:
        """Read ``[offset, offset + length)`` of `src_fd` into the same range of the replica.

        Raises:
            OSError: the read failed, or the source ended early (ENODATA).
        """
        self.allocate(file, offset, length)
        with self.view(file, offset, length) as view:
            done = 0
            while done < length:
                n = os.preadv(src_fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.ENODATA, "file shorter than planned")
                done += n
        return done

    def punch(self, file: int, offset: int, length: int) -> bool:
        """Free the range's memory (``fallocate(PUNCH_HOLE)``); reads of it give zeros after.

        Returns:
            Whether the kernel accepted it.
        """
        if length <= 0:
            return True
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fds[file], mode, offset, length) != 0:
            log.debug("punch hole in %s: %s", self.paths[file], os.strerror(ctypes.get_errno()))
            return False
        return True

    def allocated_bytes(self) -> int:
        """Bytes of memory or disk the replica's files hold now."""
        total = 0
        for fd in self._fds:
            with contextlib.suppress(OSError):
                total += os.fstat(fd).st_blocks * 512
        return total

    def claimed_here(self, stripe: int) -> bool:
        """Whether a thread of this process holds the claim of `stripe`."""
        with self._lock:
            return stripe in self._claimed

    @contextlib.contextmanager
    def claim(self, stripe: int) -> Iterator[bool]:
        """Claim the filling of `stripe` among the local ranks (and threads): yields whether
        this caller holds it. A claim dies with its process."""
        with self._lock:
            if stripe in self._claimed:
                mine = False
            else:
                try:
                    fcntl.lockf(self._map_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1,
                                _CLAIM_BASE + stripe)  # fmt: skip
                    self._claimed.add(stripe)
                    mine = True
                except OSError:
                    mine = False
        try:
            yield mine
        finally:
            if mine:
                with self._lock:
                    fcntl.lockf(self._map_fd, fcntl.LOCK_UN, 1, _CLAIM_BASE + stripe)
                    self._claimed.discard(stripe)

    # ---------------------------------------------------------------- shutdown
    def close(self, *, keep_mappings: bool = False) -> bool:
        """Leave the replica; the last local rank to leave removes its directory. Idempotent.

        Args:
            keep_mappings: leave the file mappings in place (a transfer that timed out may
                still write into them: they are freed when the process exits).

        Returns:
            Whether this call removed the directory.
        """
        if self._closed:
            return False
        m = getattr(self, "_map", None)
        ranks = getattr(self, "ranks", None)
        if ranks is not None:
            ranks.finish_consuming()
            ranks.closed = True
        self._closed = True
        if not keep_mappings:
            for fm in self._maps:
                if fm is not None:
                    with contextlib.suppress(BufferError):  # a view still exported: GC frees it
                        fm.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        removed = False
        try:
            fcntl.flock(self._alive_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another local rank still uses it
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            removed = True
        finally:
            os.close(self._alive_fd)
        if m is not None:
            with contextlib.suppress(BufferError):
                m.close()
            os.close(self._map_fd)
        return removed

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed
