"""What part of a file is in the page cache, and how to drop it.

`cachestat` (syscall 451, Linux >= 6.5) answers for gigabytes in well under a
millisecond; older kernels (or a seccomp policy that denies it) fall back to `mincore`
over a temporary mapping. On overlayfs `cachestat` sees the overlay's own, always empty,
mapping, so `mincore` (which goes through to the real file) answers there.

Both answer only for a file the caller owns or may write (or as root): otherwise
`cachestat` fails with EPERM and `mincore` pretends every page is cached, a guard against
page-cache side channels. Such files raise `ResidencyUnknownError` here, never a made-up
figure; the engine then simply reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from engine import _libc
from engine.errors import ResidencyUnknownError
from engine.fstype import OVERLAYFS_MAGIC, filesystem_type_fd

__all__ = [
    "CacheStatus",
    "cache_status",
    "cache_status_fd",
    "evict",
    "evict_fd",
    "processes_mapping",
    "resident_bytes",
    "resident_bytes_fd",
]

log = logging.getLogger(__name__)
_cachestat_works: bool | None = None


def _unknown(fd: int) -> ResidencyUnknownError:
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = f"fd {fd}"
    return ResidencyUnknownError(
        errno.EPERM,
        "page-cache residency is reported only for files the caller owns or may write",
        name,
    )


@functools.cache
def _overflow_uid() -> int:
    try:
        with open("/proc/sys/kernel/overflowuid", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def _may_inspect(fd: int) -> bool:
    """Whether the kernel reports this file's residency truthfully to us.

    Mirrors the kernel's check for `mincore` and `cachestat`: the file is open for
    writing, or the caller owns it, or may write it. Never more permissive than the
    kernel: "root" alone is not enough (capabilities may be dropped, or root may be
    mapped in a user namespace), and an owner shown as the overflow uid is nobody's.
    """
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        return True
    uid = os.fstat(fd).st_uid
    if uid == os.geteuid() and uid != _overflow_uid():
        return True
    return os.access(
        f"/proc/self/fd/{fd}", os.W_OK, effective_ids=os.access in os.supports_effective_ids
    )


def _on_overlayfs(fd: int) -> bool:
    try:
        return filesystem_type_fd(fd) == OVERLAYFS_MAGIC
    except OSError:
        return False


def _cachestat(fd: int, offset: int, length: int) -> int | None:
    """Resident pages in the range via cachestat, or None when the syscall is missing.

    Raises:
        ResidencyUnknownError: the kernel refuses to answer for this file (EPERM).
    """
    out = _cachestat_raw(fd, offset, length)
    return None if out is None else int(out.nr_cache)


def _cachestat_raw(fd: int, offset: int, length: int) -> _libc.Cachestat | None:
    """The kernel's cachestat record for the range, or None when the syscall is missing.

    Raises:
        ResidencyUnknownError: the kernel refuses to answer for this file (EPERM).
    """
    global _cachestat_works
    if _cachestat_works is False:
        return None
    rng = _libc.CachestatRange(offset, length)
    out = _libc.Cachestat()
    ret = _libc.libc.syscall(
        _libc.SYS_CACHESTAT,
        ctypes.c_int(fd),
        ctypes.byref(rng),
        ctypes.byref(out),
        ctypes.c_uint(0),
    )
    if ret != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM and not _may_inspect(fd):  # this file is not ours to inspect
            raise _unknown(fd)
        if code in (errno.ENOSYS, errno.EPERM):  # missing, or denied by a seccomp policy
            if _cachestat_works is None:
                log.info("cachestat unavailable (%s); using mincore", os.strerror(code))
            _cachestat_works = False
            return None
        raise OSError(code, f"cachestat: {os.strerror(code)}")
    _cachestat_works = True
    return out


def _mincore(fd: int, offset: int, length: int) -> int:
    """Resident pages in the range via mmap + mincore.

    Raises:
        ResidencyUnknownError: mincore would claim every page of this file is cached.
    """
    if not _may_inspect(fd):
        raise _unknown(fd)
    addr, map_len, _ = _libc.map_range(fd, offset, length)
    try:
        pages = (map_len + _libc.PAGE_SIZE - 1) // _libc.PAGE_SIZE
        vec = ctypes.create_string_buffer(pages)
        if _libc.libc.mincore(addr, map_len, vec) != 0:
            _libc.raise_errno("mincore")
        return sum(b & 1 for b in vec.raw)
    finally:
        _libc.libc.munmap(addr, map_len)


def resident_bytes_fd(fd: int, offset: int = 0, length: int | None = None) -> int:
    """Bytes of [offset, offset+length) of the open file `fd` that are in the page cache.

    Counted in whole pages and clipped to the range and to the file's size.

    Args:
        fd: an open file descriptor of a regular file.
        offset: first byte of the range.
        length: bytes in the range; None means to the end of the file.

    Returns:
        The resident bytes, between 0 and the range's length.

    Raises:
        ResidencyUnknownError: the kernel reports residency only to the file's owner, a
            user who may write it, or root (an `OSError`, errno EPERM).

    Example:
        >>> with open("/etc/hostname", "rb") as f:
        ...     _ = f.read()
        ...     resident_bytes_fd(f.fileno()) > 0
        True
    """
    size = os.fstat(fd).st_size
    end = size if length is None else min(size, offset + length)
    if end <= offset:
        return 0
    page = _libc.PAGE_SIZE
    start = offset - offset % page
    stop = -(-end // page) * page
    pages = None if _on_overlayfs(fd) else _cachestat(fd, start, stop - start)
    if pages is None:
        pages = _mincore(fd, start, end - start)
    total_pages = (stop - start) // page
    if pages >= total_pages:
        return end - offset
    # Partial residency: bytes are counted per page, clipped to the requested range.
    return min(pages * page, end - offset)


def resident_bytes(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> int:
    """Bytes of [offset, offset+length) of the file at `path` that are in the page cache.

    Args:
        path: a regular file.
        offset: first byte of the range.
        length: bytes in the range; None means to the end of the file.

    Returns:
        The resident bytes.

    Raises:
        ResidencyUnknownError: see `resident_bytes_fd`.

    Example:
        >>> resident_bytes("/etc/hostname") >= 0
        True
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return resident_bytes_fd(fd, offset, length)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """What the page cache holds of one file, as `cachestat` reports it.

    Attributes:
        cached_bytes: bytes of the file in the page cache.
        dirty_bytes: cached bytes written but not yet sent to storage (not evictable).
        writeback_bytes: cached bytes being written to storage now (not evictable).
    """

    cached_bytes: int
    dirty_bytes: int
    writeback_bytes: int


def cache_status_fd(fd: int) -> CacheStatus | None:
    """Cached, dirty and under-writeback bytes of the open file `fd`.

    Args:
        fd: an open file descriptor of a regular file.

    Returns:
        The status, or None where `cachestat` is unavailable (Linux < 6.5, seccomp,
        overlayfs), since `mincore` cannot tell dirty pages from clean ones.

    Raises:
        ResidencyUnknownError: the kernel reports residency only to the file's owner, a
            user who may write it, or root.

    Example:
        >>> with open("/etc/hostname", "rb") as f:
        ...     st = cache_status_fd(f.fileno())
        >>> st is None or st.dirty_bytes >= 0
        True
    """
    size = os.fstat(fd).st_size
    if size == 0 or _on_overlayfs(fd):
        return None if size else CacheStatus(0, 0, 0)
    out = _cachestat_raw(fd, 0, 0)  # length 0: to the end of the file
    if out is None:
        return None
    page = _libc.PAGE_SIZE
    return CacheStatus(
        min(size, int(out.nr_cache) * page),
        int(out.nr_dirty) * page,
        int(out.nr_writeback) * page,
    )


def cache_status(path: str | os.PathLike[str]) -> CacheStatus | None:
    """Cached, dirty and under-writeback bytes of the file at `path` (see `cache_status_fd`).

    Args:
        path: a regular file.

    Returns:
        The status, or None where `cachestat` is unavailable.

    Example:
        >>> st = cache_status("/etc/hostname")
        >>> st is None or st.cached_bytes >= 0
        True
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return cache_status_fd(fd)
    finally:
        os.close(fd)


def _has_unwritten_pages(fd: int) -> bool:
    """Whether pages left after a drop may be dirty or under writeback."""
    try:
        st = cache_status_fd(fd)
        if st is not None:
            return st.dirty_bytes > 0 or st.writeback_bytes > 0
        return resident_bytes_fd(fd) > 0  # mincore cannot tell why: assume unwritten
    except OSError:
        return False


def evict_fd(fd: int) -> None:
    """Drop the unmapped cached pages of the open file `fd` (see `evict`).

    Args:
        fd: an open file descriptor.

    Example:
        >>> with open("/etc/hostname", "rb") as f:
        ...     evict_fd(f.fileno())
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if not _has_unwritten_pages(fd):
        return
    # DONTNEED only starts writeback and skips the pages still dirty or being written,
    # which a file just written (or one queued behind other writes) has plenty of: wait
    # until they are on storage, then drop them.
    try:
        os.fdatasync(fd)
    except OSError as exc:  # e.g. a FUSE server without fsync, a read-only mount
        log.debug("fdatasync before eviction: %s", exc)
        return
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def processes_mapping(paths: Iterable[str | os.PathLike[str]]) -> dict[int, str]:
    """Processes that map any of the files: their pages stay cached through an eviction.

    Reads ``/proc/<pid>/maps`` of every process this user may inspect (others are skipped).

    Args:
        paths: the files to look for.

    Returns:
        pid -> command name, for each process with a mapping of one of the files.

    Example:
        >>> processes_mapping(["/etc/hostname"])
        {}
    """
    wanted: set[tuple[str, int]] = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            wanted.add((f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino))
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) >= 5 and (fields[3], int(fields[4])) in wanted:
                        with open(f"/proc/{entry.name}/comm", encoding="utf-8") as c:
                            found[int(entry.name)] = c.read().strip()
                        break
        except (OSError, ValueError):
            continue
    return found


def evict(path: str | os.PathLike[str]) -> None:
    """Drop the file's unmapped pages from the page cache (posix_fadvise DONTNEED).

    ``/proc/sys/vm/drop_caches`` needs privileges that containers rarely have; this works
    per file for any user who can open it. Pages mapped by a running process stay. Dirty
    pages (a file just written) are first written to storage, then dropped.

    Args:
        path: a regular file.

    Example:
        >>> evict("/etc/hostname")
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        evict_fd(fd)
    finally:
        os.close(fd)
