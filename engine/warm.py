"""The I/O that carries out the scheduler's decisions: warm an extent, drop a range.

Every system call runs on the daemon pool (`engine.pool`), never on the event loop: a
stalled server must not stop the loop from cancelling. The scheduler talks to one small
interface, `Warmer.start(file, extent) -> future of Outcome`; `warmer_for` adapts the
backend to it (a synchronous `Backend` runs whole extents on the pool, an `AsyncBackend`
is awaited on the loop).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence

from engine.backends import AsyncBackend, Backend, ProcessBackend
from engine.errors import Failure
from engine.plan import Extent, ResolvedFile
from engine.pool import DaemonPool
from engine.reader_process import ReaderGone, ReaderProcess, ReadResult
from engine.report import Outcome, OutcomeKind
from engine.residency import resident_bytes_fd

__all__ = ["Dropper", "OpenFile", "Warmer", "warm_extent", "warmer_for"]

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: open() errors worth one more try before the whole file counts as failed.
_TRANSIENT_OPEN_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.ETIMEDOUT}
)
_OPEN_RETRY_S = 0.05


class _AlreadyFailed(Exception):
    """The file failed to open before; the extent is skipped without a new attempt."""


class OpenFile:
    """One planned file: opened lazily by the first worker that needs it, closed after its
    rank's last extent, so open descriptors stay bounded by the number of in-flight extents.

    Args:
        meta: the file as planned.
        remaining: this rank's extents of it (each is released once, read or not).
    """

    __slots__ = ("error", "fd", "lock", "meta", "note", "remaining")

    def __init__(self, meta: ResolvedFile, remaining: int) -> None:
        self.meta = meta
        self.remaining = remaining
        self.fd = -1
        self.error: Failure | None = None  # set once: later extents of the file skip at once
        self.note: str | None = None
        self.lock = threading.Lock()

    def acquire(self) -> int:
        """Open the file if needed and return its fd; raise OSError when that fails."""
        with self.lock:
            if self.error is not None:
                raise _AlreadyFailed
            if self.fd < 0:
                self.fd = self._open()
            return self.fd

    def _open(self) -> int:
        try:
            fd = os.open(self.meta.path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno not in _TRANSIENT_OPEN_ERRORS:
                raise
            time.sleep(_OPEN_RETRY_S)  # out of fds for a moment, a soft mount
            fd = os.open(self.meta.path, _OPEN_FLAGS)  # once more, then it is final
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            if (st.st_dev, st.st_ino) != (self.meta.dev, self.meta.ino):
                raise OSError(errno.ESTALE, "replaced by a new file since planning")
        except BaseException:
            os.close(fd)
            raise
        if st.st_size != self.meta.size:
            self.note = (
                f"{self.meta.path}: size changed from {self.meta.size} to "
                f"{st.st_size} bytes since planning"
            )
        return fd

    def fail(self, failure: Failure) -> bool:
        """Record the whole-file failure; return False if one was already recorded."""
        with self.lock:
            if self.error is not None:
                return False
            self.error = failure
            return True

    def release(self, n: int = 1) -> None:
        """Mark `n` extents finished; close the fd after the last one."""
        with self.lock:
            self.remaining -= n
            if self.remaining <= 0 and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _prepare(f: OpenFile, ext: Extent, skip_cached: bool) -> tuple[int, Outcome | None]:
    """Runs on a worker thread: open the file (once) and check residency.

    Returns ``(fd, outcome)``: the outcome is set when nothing is left to read (the file
    failed, or the extent is already resident); ``fd`` is -1 then.
    """
    try:
        fd = f.acquire()
    except _AlreadyFailed:
        return -1, Outcome(OutcomeKind.FILE_FAILED)
    except OSError as exc:
        failure = Failure.from_os_error(ext.path, 0, 0, exc)
        first = f.fail(failure)
        return -1, Outcome(OutcomeKind.FAILED if first else OutcomeKind.FILE_FAILED, 0, failure)
    if skip_cached:
        try:
            if resident_bytes_fd(fd, ext.offset, ext.length) >= ext.length:
                return -1, Outcome(OutcomeKind.CACHED, ext.length)
        except OSError:  # residency unknown (e.g. no cachestat, no mmap): just read
            pass
    return fd, None


def _read_outcome(ext: Extent, n: int) -> Outcome:
    """The outcome of reading `n` bytes of `ext` (fewer: the file ended early)."""
    if n >= ext.length:
        return Outcome(OutcomeKind.WARMED, n)
    missing = Failure(
        ext.path, ext.offset + n, ext.length - n, None,
        "file ended early (truncated since planning?)",
    )  # fmt: skip
    return Outcome(OutcomeKind.WARMED, n, missing)


def _read_failed(ext: Extent, exc: OSError) -> Outcome:
    failure = Failure.from_os_error(ext.path, ext.offset, ext.length, exc)
    return Outcome(OutcomeKind.FAILED, 0, failure)


def warm_extent(
    f: OpenFile, ext: Extent, backend: Backend, skip_cached: bool, pieces: int = 1
) -> Outcome:
    """Runs on a worker thread: warm one extent with a synchronous backend.

    Args:
        f: the extent's file (released here, whatever happens).
        ext: the extent.
        backend: how to read it.
        skip_cached: whether an extent already resident is left alone.
        pieces: planned extents that `ext` joins (each is released).

    Returns:
        What became of the extent; OS errors are outcomes, never raised.
    """
    try:
        fd, done = _prepare(f, ext, skip_cached)
        if done is not None:
            return done
        return _read_outcome(ext, backend.read_into_cache(fd, ext.offset, ext.length))
    except OSError as exc:
        return _read_failed(ext, exc)
    finally:
        f.release(pieces)


class Warmer(abc.ABC):
    """Warms the extents the scheduler submits, each on its own, and reports how it went.

    Args:
        pool: the prefetch's daemon pool, where every blocking call runs.
        skip_cached: whether an extent already resident is left alone.
    """

    def __init__(self, pool: DaemonPool, skip_cached: bool) -> None:
        self._pool = pool
        self._skip_cached = skip_cached

    @abc.abstractmethod
    def start(
        self, f: OpenFile, ext: Extent, pieces: int = 1, *, ahead_limit: int = 0
    ) -> asyncio.Future[Outcome]:
        """Start warming `ext` of `f` (`pieces` planned extents joined into one read, each
        released once it is done); return its outcome's future, which an OS error never
        fails. `ahead_limit`: no local rank needs the bytes of the file from this offset on
        (0: no limit), so read-ahead past it is waste (kept from happening by the reader
        process; the in-process backends ignore it)."""

    @property
    def cpu_s(self) -> float:
        """CPU seconds spent outside the pool (a reader process's), 0 by default."""
        return 0.0

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Cancel what can be cancelled of the extents still running (nothing by default:
        a read on a worker thread cannot be, and is abandoned)."""


class _ThreadWarmer(Warmer):
    """A synchronous backend on the pool: opening, the residency check, the read and the
    file's release run in one call on one worker. A read left running by a cancelled
    prefetch thus still releases its file, on its own thread, when it returns; and a
    close that blocks (a FUSE flush to a stalled server) never blocks the loop."""

    def __init__(self, backend: Backend, pool: DaemonPool, skip_cached: bool) -> None:
        super().__init__(pool, skip_cached)
        self._backend = backend

    def start(
        self, f: OpenFile, ext: Extent, pieces: int = 1, *, ahead_limit: int = 0
    ) -> asyncio.Future[Outcome]:
        return self._pool.run(warm_extent, f, ext, self._backend, self._skip_cached, pieces)


class _LoopWarmer(Warmer):
    """An `AsyncBackend` awaited on the loop; opening and the residency check run on the pool."""

    def __init__(self, backend: AsyncBackend, pool: DaemonPool, skip_cached: bool) -> None:
        super().__init__(pool, skip_cached)
        self._backend = backend
        self._tasks: set[asyncio.Future[Outcome]] = set()

    def start(
        self, f: OpenFile, ext: Extent, pieces: int = 1, *, ahead_limit: int = 0
    ) -> asyncio.Future[Outcome]:
        task = asyncio.ensure_future(self._warm(f, ext, pieces))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _warm(self, f: OpenFile, ext: Extent, pieces: int) -> Outcome:
        try:
            fd, done = await self._pool.run(_prepare, f, ext, self._skip_cached)
            if done is not None:
                return done
            n = await self._backend.aread_into_cache(
                fd, ext.offset, ext.length, executor=self._pool.executor
            )
            return _read_outcome(ext, n)
        except OSError as exc:
            return _read_failed(ext, exc)
        finally:
            f.release(pieces)

    async def aclose(self) -> None:
        """Cancel the reads still running (their executor's threads are daemons)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: errnos that fail the whole file, not one range of it (later extents skip at once).
_FILE_ERRORS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ESTALE}
)


class _ProcessWarmer(Warmer):
    """Whole extents warmed by path in a reader process (`engine.reader_process`).

    This process opens none of the files: a read, open or close stuck in a stalled FUSE
    client holds only the reader, which `aclose` abandons when the prefetch is cancelled.
    """

    def __init__(self, pool: DaemonPool, skip_cached: bool, threads: int) -> None:
        super().__init__(pool, skip_cached)
        self._reader = ReaderProcess(threads)
        self._cpu_s = 0.0

    def start(
        self, f: OpenFile, ext: Extent, pieces: int = 1, *, ahead_limit: int = 0
    ) -> asyncio.Future[Outcome]:
        if f.error is not None:
            f.release(pieces)
            done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            done.set_result(Outcome(OutcomeKind.FILE_FAILED))
            return done
        fut = self._reader.submit(
            ext.path, ext.offset, ext.length, skip_cached=self._skip_cached, ahead_limit=ahead_limit
        )
        return asyncio.ensure_future(self._outcome(f, ext, pieces, asyncio.wrap_future(fut)))

    async def _outcome(
        self, f: OpenFile, ext: Extent, pieces: int, fut: asyncio.Future[ReadResult]
    ) -> Outcome:
        try:
            res = await fut
        except ReaderGone:
            return Outcome(OutcomeKind.FILE_FAILED)  # abandoned: the prefetch is ending
        except OSError as exc:
            if exc.errno in _FILE_ERRORS:
                failure = Failure.from_os_error(ext.path, 0, 0, exc)
                first = f.fail(failure)
                kind = OutcomeKind.FAILED if first else OutcomeKind.FILE_FAILED
                return Outcome(kind, 0, failure)
            return _read_failed(ext, exc)
        finally:
            f.release(pieces)
        if res.cached_bytes >= ext.length:
            return Outcome(OutcomeKind.CACHED, ext.length)
        return _read_outcome(ext, res.warmed_bytes)

    @property
    def cpu_s(self) -> float:
        return self._cpu_s or self._reader.cpu_s()

    async def aclose(self) -> None:
        """Abandon the reader: nothing waits for a read the server may never answer."""
        self._cpu_s = self._reader.cpu_s()
        self._reader.abandon()


def warmer_for(
    backend: Backend, pool: DaemonPool, skip_cached: bool, *, threads: int = 1
) -> Warmer:
    """The `Warmer` that runs `backend`: a reader process for `ProcessBackend`, awaited on
    the loop for an `AsyncBackend`, on the pool's workers for any other.

    Args:
        backend: the resolved backend.
        pool: the prefetch's daemon pool.
        skip_cached: whether an extent already resident is left alone.
        threads: reads a reader process runs at once (`ProcessBackend` only).

    Returns:
        The warmer.

    Example:
        >>> from engine.backends import PreadBackend
        >>> type(warmer_for(PreadBackend(), DaemonPool(1), True)).__name__
        '_ThreadWarmer'
    """
    if isinstance(backend, ProcessBackend):
        return _ProcessWarmer(pool, skip_cached, threads)
    if isinstance(backend, AsyncBackend):
        return _LoopWarmer(backend, pool, skip_cached)
    return _ThreadWarmer(backend, pool, skip_cached)


class Dropper:
    """Drops ranges of the checkpoint's axis from the page cache (``posix_fadvise(DONTNEED)``).

    Each drop runs on a worker, opens the files it needs and closes them again. A page that
    some process still maps is kept by the kernel; a later drop takes it.

    Args:
        files: the checkpoint's files in consumption order (they make up the axis).
    """

    def __init__(self, files: Sequence[ResolvedFile]) -> None:
        self._spans: list[tuple[int, ResolvedFile]] = []
        pos = 0
        for meta in files:
            self._spans.append((pos, meta))
            pos += meta.size
        self._failed = False

    def drop(self, lo: int, hi: int) -> int:
        """Runs on a worker thread: drop [lo, hi) of the axis; return the bytes asked for."""
        n = 0
        for start, meta in self._spans:
            end = start + meta.size
            if end <= lo or meta.size == 0:
                continue
            if start >= hi:
                break
            a, b = max(lo, start) - start, min(hi, end) - start
            a -= a % _PAGE  # the kernel keeps partial pages: take the one left last time
            if self._drop_file(meta.path, a, b):
                n += b - a
        return n

    def _drop_file(self, path: str, a: int, b: int) -> bool:
        try:
            fd = os.open(path, _OPEN_FLAGS)
            try:
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as exc:  # only an optimisation: say it once, go on
            if not self._failed:
                self._failed = True
                log.info("could not drop consumed bytes of %s: %s", path, exc)
            return False
        return True
