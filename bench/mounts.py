"""What the bench needs of the mount table and of a mount's read-ahead window.

Built on the engine's one reader of ``/proc/self/mountinfo`` and of ``read_ahead_kb``
(`engine.mounts`); the bench adds only what it alone does: ask whether a path is a mount
point without touching it, and set a mount's read-ahead.
"""

from __future__ import annotations

import os

from engine import mounts as _mounts
from engine.mounts import Mount, mount_of

__all__ = ["Mount", "is_mounted", "mount_of", "read_ahead_kb", "set_read_ahead_kb"]


def is_mounted(path: str) -> bool:
    """Whether `path` is a mount point, without touching the mount itself.

    Not ``os.path.ismount``: that stats the mount's root, which hangs on a stalled FUSE
    server and fails with ENOTCONN on a dead one.

    Example:
        >>> is_mounted("/proc")
        True
    """
    return path in _mounts.mount_points()


def read_ahead_kb(path: str | os.PathLike[str]) -> int | None:
    """The read-ahead window (KiB) of the filesystem holding `path`, or None if unreadable."""
    return _mounts.read_ahead_kb(os.stat(path).st_dev)


def set_read_ahead_kb(path: str | os.PathLike[str], kb: int) -> None:
    """Set the read-ahead window (KiB) of the filesystem holding `path` (root only).

    Raises:
        OSError: the window cannot be written.
    """
    with open(_mounts.read_ahead_path(os.stat(path).st_dev), "w", encoding="ascii") as f:
        f.write(str(int(kb)))
