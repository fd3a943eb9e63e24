"""What filesystem a checkpoint lives on, and whether ``prefetch="auto"`` turns prefetch on.

The decision comes from ``statfs(2)``'s ``f_type`` (called through ctypes): network and
FUSE filesystems (where every page fault is a round trip to a server) get prefetch; local
disks, tmpfs and unknown filesystems do not. ``/proc/self/mountinfo`` supplies the mount's
type name for the log line (``fuse.sshfs`` says more than ``fuse``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import memory_budget

__all__ = [
    "LOCAL_FILESYSTEMS",
    "NETWORK_FILESYSTEMS",
    "AutoDecision",
    "decide_auto",
    "filesystem_type",
    "mem_available_bytes",
    "mount_fstype",
]

log = logging.getLogger(__name__)

#: statfs f_type magic numbers of network, cluster and FUSE filesystems (prefetch on).
NETWORK_FILESYSTEMS: dict[int, str] = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x19830326: "beegfs",
    0x65735546: "fuse",  # also fuseblk, virtiofs, sshfs, s3fs, gcsfuse, JuiceFS, GlusterFS...
    0x5346414F: "afs",
    0x6B414653: "kafs",
    0x73757245: "coda",
    0x564C: "ncp",
    0xAAD7AAEA: "panfs",
    0x20030528: "orangefs",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x786F4256: "vboxsf",
}

#: statfs f_type magic numbers of local filesystems (prefetch off), for the log line.
LOCAL_FILESYSTEMS: dict[int, str] = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x958458F6: "hugetlbfs",
    0x794C7630: "overlayfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
    0x5346544E: "ntfs",
    0x3153464A: "jfs",
    0x52654973: "reiserfs",
    0x3434: "nilfs",
}


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux; f_type is the first field on every architecture.
    # The padding leaves room for the rest of the struct on any ABI.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc: ctypes.CDLL | None = None


def filesystem_type(path: str | os.PathLike[str]) -> int:
    """Return ``statfs(path).f_type`` as an unsigned 32-bit magic number.

    Args:
        path: any existing path on the filesystem.

    Returns:
        The filesystem's magic number (for example 0xEF53 for ext4).

    Raises:
        OSError: statfs failed (missing path, permission).

    Example:
        >>> hex(filesystem_type("/proc"))
        '0x9fa0'
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if _libc.statfs(os.fsencode(os.fspath(path)), ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(path))
    return buf.f_type & 0xFFFFFFFF


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


def mount_fstype(path: str | os.PathLike[str]) -> str | None:
    """The type name of the mount holding `path` (``"ext4"``, ``"fuse.sshfs"``), if known.

    Args:
        path: an existing path.

    Returns:
        The fstype of the longest mount point that contains ``realpath(path)``, or None
        when ``/proc/self/mountinfo`` cannot be read.

    Example:
        >>> mount_fstype("/proc")
        'proc'
    """
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if not sep or len(fields) < 5 or not right.split():
                    continue
                mnt = _unescape(fields[4])
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) >= best[0]):
                    best = (len(mnt), right.split()[0])
    except OSError:
        return None
    return best[1] if best else None


def mem_available_bytes() -> int | None:
    """``MemAvailable`` in bytes (from `engine.memory_budget`), or None when unknown.

    Example:
        >>> (mem_available_bytes() or 0) >= 0
        True
    """
    try:
        return memory_budget().mem_available
    except (OSError, ValueError):
        return None


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / (1 << 30):.1f} GiB"


@dataclass(frozen=True)
class AutoDecision:
    """The outcome of ``prefetch="auto"``.

    Attributes:
        enabled: whether prefetch is turned on.
        reason: one line saying why (filesystem, checkpoint size, available memory).
        filesystem: the filesystem's name (the mount's type when known).
        f_type: the statfs magic number, or None when statfs failed.
    """

    enabled: bool
    reason: str
    filesystem: str
    f_type: int | None


def decide_auto(
    paths: Sequence[str],
    total_bytes: int,
    *,
    statfs: Callable[[str], int] = filesystem_type,
    fstype: Callable[[str], str | None] = mount_fstype,
    mem_available: Callable[[], int | None] = mem_available_bytes,
) -> AutoDecision:
    """Decide whether to prefetch `paths`: on for network/FUSE filesystems, off otherwise.

    One path per distinct directory is examined; prefetch is on when any of them is on a
    network or FUSE filesystem. Logs one INFO line with the decision and its reason.

    Args:
        paths: the checkpoint's files.
        total_bytes: the checkpoint's size (for the log line).
        statfs: returns the f_type of a path (tests pass a fake).
        fstype: returns the mount's type name of a path, or None.
        mem_available: returns MemAvailable in bytes, or None.

    Returns:
        The decision with its reason.

    Example:
        >>> decide_auto(["/proc/self/status"], 0).enabled
        False
    """
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(os.path.dirname(os.path.abspath(p)) or "/", None)
    chosen: tuple[str, str, int | None] | None = None  # (dir, name, f_type)
    for directory in seen:
        try:
            magic: int | None = statfs(directory)
        except OSError as exc:
            log.debug("statfs(%s) failed: %s", directory, exc)
            magic = None
        name = fstype(directory)
        if name is None and magic is not None:
            name = NETWORK_FILESYSTEMS.get(magic) or LOCAL_FILESYSTEMS.get(magic)
        if name is None:
            name = "unknown"
        if magic in NETWORK_FILESYSTEMS:
            chosen = (directory, name, magic)
            break
        if chosen is None:
            chosen = (directory, name, magic)
    directory, name, magic = chosen if chosen else ("", "unknown", None)
    enabled = magic in NETWORK_FILESYSTEMS
    if enabled:
        kind = f"network/FUSE filesystem {NETWORK_FILESYSTEMS[magic]}"  # type: ignore[index]
    elif magic in LOCAL_FILESYSTEMS:
        kind = f"local filesystem {LOCAL_FILESYSTEMS[magic]}"
    else:
        kind = "filesystem not known to be remote"
    magic_text = f"0x{magic:x}" if magic is not None else "statfs failed"
    reason = (
        f"{directory} is on {name} ({kind}, f_type {magic_text}); "
        f"checkpoint {_gib(total_bytes)}, MemAvailable {_gib(mem_available())}"
    )
    log.info("prefetch=auto -> %s: %s", "on" if enabled else "off", reason)
    return AutoDecision(enabled, reason, name, magic)
