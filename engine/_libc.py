"""ctypes bindings to the few libc calls the standard library lacks.

Calls through ``ctypes.CDLL`` release the GIL, which is why the populate backend and the
mincore fallback go through here rather than through the ``mmap`` module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

PAGE_SIZE = mmap.PAGESIZE
MADV_POPULATE_READ = 22
MAP_FAILED = ctypes.c_void_p(-1).value
SYS_CACHESTAT = 451  # x86_64, aarch64 and most others since Linux 6.5

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mincore.restype = ctypes.c_int
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long


class CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def raise_errno(what: str) -> None:
    """Raise OSError from ctypes' saved errno."""
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def map_range(fd: int, offset: int, length: int) -> tuple[int, int, int]:
    """mmap [offset, offset+length) of `fd` read-only; return (address, map_length, skew).

    The mapping starts at the page below `offset`; `skew` is `offset` minus that page.
    """
    start = offset - offset % PAGE_SIZE
    skew = offset - start
    map_len = length + skew
    addr = libc.mmap(None, map_len, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == MAP_FAILED:
        raise_errno("mmap")
    return addr, map_len, skew
