"""What the kernel says about mounts: the mount table and a mount's read-ahead window.

These are the bench's only readers of ``/proc/self/mountinfo`` and of a mount's
``read_ahead_kb``, kept small so that they can be replaced by the engine's own.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

__all__ = ["Mount", "is_mounted", "mount_of", "mounts", "read_ahead_kb", "set_read_ahead_kb"]

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, what filesystem, from what source."""

    mount_point: str
    fstype: str
    source: str


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo: each escape is one
    # byte (\351 is 0xE9, part of a UTF-8 sequence or not), decoded as file names are.
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def mounts() -> list[Mount]:
    """The mounts of this process's mount namespace, in the kernel's order.

    Returns:
        One `Mount` per line of ``/proc/self/mountinfo``.

    Raises:
        OSError: the file cannot be read.

    Example:
        >>> any(m.mount_point == "/" for m in mounts())
        True
    """
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        left, _, right = line.partition(b" - ")
        fields, tail = left.split(b" "), right.split(b" ")
        if len(fields) >= 5 and len(tail) >= 2:
            out.append(Mount(_unescape(fields[4]), _unescape(tail[0]), _unescape(tail[1])))
    return out


def is_mounted(path: str) -> bool:
    """Whether `path` is a mount point, without touching the mount itself.

    Not ``os.path.ismount``: that stats the mount's root, which hangs on a stalled FUSE
    server and fails with ENOTCONN on a dead one.
    """
    return any(m.mount_point == path for m in mounts())


def mount_of(path: str | os.PathLike[str]) -> Mount | None:
    """The mount that holds `path` (the longest mount point above it), or None.

    Example:
        >>> mount_of("/").mount_point
        '/'
    """
    real = os.path.realpath(path)
    best: Mount | None = None
    with contextlib.suppress(OSError):
        for m in mounts():
            mp = m.mount_point
            inside = real == mp or real.startswith(mp.rstrip("/") + "/")
            if inside and (best is None or len(mp) >= len(best.mount_point)):
                best = m
    return best


def _bdi_read_ahead(path: str | os.PathLike[str]) -> str:
    dev = os.stat(path).st_dev
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"


def read_ahead_kb(path: str | os.PathLike[str]) -> int | None:
    """The read-ahead window (KiB) of the filesystem holding `path`, or None if unreadable."""
    try:
        with open(_bdi_read_ahead(path), encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_read_ahead_kb(path: str | os.PathLike[str], kb: int) -> None:
    """Set the read-ahead window (KiB) of the filesystem holding `path` (root only).

    Raises:
        OSError: the window cannot be written.
    """
    with open(_bdi_read_ahead(path), "w", encoding="ascii") as f:
        f.write(str(int(kb)))
