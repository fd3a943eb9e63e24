"""How one extent of an open file is read into the page cache.

Every backend implements `Backend.read_into_cache(fd, offset, length) -> int`: make the
bytes [offset, offset+length) of `fd` resident, and return how many bytes the file really
had in that range (less than `length` only when the file ended early). Backends are
shared by the worker threads of one prefetch, so they keep per-thread state only.
Errors are raised as OSError; the scheduler records them. An `AsyncBackend` also offers
`aread_into_cache`, which the scheduler awaits on its event loop instead.
"""

from __future__ import annotations

import abc
import concurrent.futures
import errno
import logging
import os
import threading
from typing import ClassVar

from engine import _libc
from engine.errors import InvalidOptionError, ResidencyUnknownError
from engine.mounts import read_ahead_bytes
from engine.residency import resident_bytes_fd
from engine.settle import is_auto

__all__ = [
    "BACKENDS",
    "AiofilesBackend",
    "AsyncBackend",
    "Backend",
    "ProcessBackend",
    "FadviseBackend",
    "PopulateBackend",
    "PreadBackend",
    "SendfileBackend",
    "check_backend",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: Bytes per sendfile/pread call inside one extent (measured: 4 MiB is past the knee).
PIECE_BYTES = 4 << 20
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class Backend(abc.ABC):
    """One way of reading a byte range of a file into the page cache."""

    #: The name users pass as ``backend=...``.
    name: ClassVar[str] = ""
    #: One line that says why this backend reads the way it does (logged once per prefetch).
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        """Make [offset, offset+length) of `fd` resident; return the bytes the file had there.

        Args:
            fd: an open, readable regular file.
            offset: first byte.
            length: bytes wanted (> 0).

        Returns:
            Bytes made resident: `length`, or less when the file ends inside the range.
        """

    @property
    def label(self) -> str:
        """The name to report: the backend really used (a fallback says so)."""
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (nothing by default)."""


class PreadBackend(Backend):
    """`preadv` into one reused buffer per worker thread: works on every filesystem."""

    name = "pread"
    description = "preadv into one reused buffer per worker thread"

    def __init__(self, *, buffer_bytes: int = PIECE_BYTES) -> None:
        self._buffer_bytes = buffer_bytes
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self._buffer_bytes))
        return buf

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        buf = self._buffer()
        done = 0
        while done < length:
            want = min(length - done, len(buf))
            n = os.preadv(fd, [buf[:want]], offset + done)
            if n == 0:
                break
            done += n
        return done


class SendfileBackend(Backend):
    """`sendfile(fd -> /dev/null)`: zero-copy, the page cache is filled by the splice.

    Falls back to `pread` (once, logged) on filesystems that cannot splice.
    """

    name = "sendfile"
    description = "zero-copy sendfile to /dev/null; pread where the filesystem cannot splice"

    def __init__(self) -> None:
        self._null = _devnull()
        self._fallback: PreadBackend | None = None
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return "pread (fallback from sendfile)" if self._fallback else self.name

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        if self._fallback is not None:
            return self._fallback.read_into_cache(fd, offset, length)
        done = 0
        while done < length:
            try:
                n = os.sendfile(self._null, fd, offset + done, min(length - done, PIECE_BYTES))
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                return done + self._fall_back(exc).read_into_cache(fd, offset + done, length - done)
            if n == 0:
                break
            done += n
        return done

    def _fall_back(self, exc: OSError) -> PreadBackend:
        with self._lock:
            if self._fallback is None:
                log.warning("sendfile unsupported here (%s); falling back to pread", exc.strerror)
                self._fallback = PreadBackend()
            return self._fallback


_null_fd = -1
_null_lock = threading.Lock()


def _devnull() -> int:
    """One write descriptor of /dev/null for the whole process, never closed.

    A per-prefetch descriptor could be closed while an abandoned worker still loops over
    sendfile pieces, and its number reused by an unrelated file: that file would receive
    the bytes. One descriptor that lives as long as the process cannot be reused.
    """
    global _null_fd
    with _null_lock:
        if _null_fd < 0:
            _null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        return _null_fd


class PopulateBackend(Backend):
    """`mmap` + `madvise(MADV_POPULATE_READ)` through ctypes (the GIL is released).

    The cheapest in CPU, but a thread blocked in the populate holds the process's mm lock:
    on a stalled network server the process cannot exit. Local filesystems or explicit
    opt-in only; never chosen by ``auto``.
    """

    name = "populate"
    description = "mmap + MADV_POPULATE_READ (local filesystems; a stalled server blocks exit)"

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        size = os.fstat(fd).st_size
        have = max(0, min(length, size - offset))
        if have == 0:
            return 0
        addr, map_len, _ = _libc.map_range(fd, offset, have)
        try:
            if _libc.libc.madvise(addr, map_len, _libc.MADV_POPULATE_READ) != 0:
                code = _libc.ctypes.get_errno()
                if code == errno.EFAULT:  # a page could not be read: report it as I/O
                    code = errno.EIO
                raise OSError(code, f"madvise(MADV_POPULATE_READ): {os.strerror(code)}")
        finally:
            _libc.libc.munmap(addr, map_len)
        return have


class FadviseBackend(Backend):
    """`posix_fadvise(WILLNEED)` in pieces no larger than the device's read-ahead, then verify.

    Pages still missing after the advice (it is only a hint) are read with `pread`.
    """

    name = "fadvise"
    description = "posix_fadvise(WILLNEED) in read-ahead-sized pieces, then pread what is missing"

    def __init__(self) -> None:
        self._pread = PreadBackend()
        self._piece_by_dev: dict[int, int] = {}

    def _piece(self, fd: int) -> int:
        dev = os.fstat(fd).st_dev
        piece = self._piece_by_dev.get(dev)
        if piece is None:
            piece = self._piece_by_dev[dev] = read_ahead_bytes(dev)
        return piece

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        size = os.fstat(fd).st_size
        have = max(0, min(length, size - offset))
        piece = self._piece(fd)
        done = 0
        while done < have:
            n = min(piece, have - done)
            os.posix_fadvise(fd, offset + done, n, os.POSIX_FADV_WILLNEED)
            done += n
        try:
            missing = have and resident_bytes_fd(fd, offset, have) < have
        except ResidencyUnknownError:  # cannot check the hint: read it all
            missing = True
        if missing:
            return self._pread.read_into_cache(fd, offset, have)
        return have


class AsyncBackend(Backend):
    """A backend whose reads are awaited on the event loop rather than run on a worker.

    The scheduler awaits `aread_into_cache` for each extent (after opening the file and
    checking residency on a worker); `read_into_cache` stays for callers off the loop.
    """

    @abc.abstractmethod
    async def aread_into_cache(
        self, fd: int, offset: int, length: int, *, executor: concurrent.futures.Executor
    ) -> int:
        """Make [offset, offset+length) of `fd` resident; return the bytes the file had there.

        Args:
            fd: an open, readable regular file; it may be closed once this returns or is
                cancelled, so use it only before (or open the file again, as aiofiles does).
            offset: first byte.
            length: bytes wanted (> 0).
            executor: where blocking calls run (the engine's daemon pool: a read stalled
                on a server never holds up the interpreter's exit).

        Returns:
            Bytes made resident: `length`, or less when the file ends inside the range.
        """


class AiofilesBackend(PreadBackend, AsyncBackend):
    """Reads through the `aiofiles` package on the event loop.

    aiofiles' calls run on the engine's daemon pool (passed as its executor), one await
    per piece: more CPU than sendfile for the same bytes. Opt-in only. The synchronous
    `read_into_cache` (used when called off the loop) is `pread`.
    """

    name = "aiofiles"
    description = "aiofiles readinto, awaited on the event loop (opt-in)"

    def __init__(self, *, buffer_bytes: int = PIECE_BYTES) -> None:
        super().__init__(buffer_bytes=buffer_bytes)
        self._free: list[memoryview] = []  # buffers reused across extents (loop thread only)

    async def aread_into_cache(
        self,
        fd: int,
        offset: int,
        length: int,
        *,
        executor: concurrent.futures.Executor | None = None,
    ) -> int:
        """Read [offset, offset+length) of the open file `fd` with aiofiles.

        The file is opened again through ``/proc/self/fd`` (the same file, even if its
        path was replaced, with an offset of its own). `executor` runs aiofiles' calls
        (None: asyncio's default executor).
        """
        import aiofiles  # imported lazily: only this backend needs it

        buf = self._free.pop() if self._free else memoryview(bytearray(self._buffer_bytes))
        done = 0
        try:
            async with aiofiles.open(
                f"/proc/self/fd/{fd}", "rb", buffering=0, executor=executor
            ) as f:
                await f.seek(offset)
                while done < length:
                    n = await f.readinto(buf[: min(length - done, len(buf))])
                    if not n:
                        break
                    done += n
        finally:
            self._free.append(buf)
        return done


class ProcessBackend(Backend):
    """`sendfile` in a reader process (`engine.reader_process`): opens and reads happen
    there, so a read stuck in a stalled network filesystem client can hold only that
    process, never the caller's. The default on network and FUSE filesystems.

    The engine runs it through its own warmer (whole extents by path); it has no
    descriptor-based `read_into_cache`.
    """

    name = "process"
    description = "sendfile in a reader process (a stalled server cannot hold this process)"

    def read_into_cache(self, fd: int, offset: int, length: int) -> int:
        raise NotImplementedError("the process backend reads by path, in its reader process")


BACKENDS: tuple[str, ...] = ("sendfile", "populate", "pread", "aiofiles", "fadvise", "process")
_CLASSES: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (
        SendfileBackend,
        PopulateBackend,
        PreadBackend,
        AiofilesBackend,
        FadviseBackend,
        ProcessBackend,
    )
}


def resolve_backend(backend: str | Backend) -> tuple[Backend, str]:
    """Turn ``backend=`` into an instance, with the line that says what was chosen and why.

    Args:
        backend: ``"auto"``, a name from `BACKENDS`, or a `Backend` instance (tests pass fakes).

    Returns:
        ``(instance, reason)``.

    Example:
        >>> b, why = resolve_backend("auto")
        >>> b.name, why.startswith("auto")
        ('sendfile', True)
    """
    check_backend(backend)
    if isinstance(backend, Backend):
        return backend, "given"
    if is_auto(backend):
        return SendfileBackend(), "auto: " + SendfileBackend.description
    cls = _CLASSES[backend]
    return cls(), "chosen: " + cls.description


def check_backend(backend: object) -> None:
    """Raise `InvalidOptionError` naming the valid backends unless `backend` is one.

    Example:
        >>> check_backend("pread")
    """
    if isinstance(backend, Backend) or (
        isinstance(backend, str) and (is_auto(backend) or backend in _CLASSES)
    ):
        return
    raise InvalidOptionError(
        f"unknown backend {backend!r}; valid backends: auto, {', '.join(BACKENDS)}"
    )
