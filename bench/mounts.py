"""What the bench needs of the mount table and of a mount's read-ahead window.

Built on the engine's one reader of ``/proc/self/mountinfo`` and of ``read_ahead_kb``
(`engine.mounts`); the bench adds only what it alone does: ask whether a path is a mount
point without touching it, and set a mount's read-ahead.
"""

from __future__ import annotations

import logging
import os
import threading

from engine import mounts as _mounts
from engine.mounts import Mount, mount_of
from engine.residency import evict

log = logging.getLogger(__name__)

__all__ = [
    "Mount",
    "is_mounted",
    "mount_of",
    "read_ahead_kb",
    "evict_mirrored",
    "set_read_ahead_kb",
    "stat_within",
]


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


def stat_within(path: str | os.PathLike[str], timeout: float) -> os.stat_result | OSError | None:
    """``os.stat(path)`` from a daemon thread, waiting at most `timeout` seconds.

    A mount's root that a stalled server never answers makes the stat hang; the caller
    gets None instead, and the daemon thread is left to end when the server answers.

    Returns:
        The stat result, the error it raised, or None when it did not answer in time.

    Example:
        >>> isinstance(stat_within("/", 5.0), os.stat_result)
        True
    """
    answer: list[os.stat_result | OSError] = []

    def probe() -> None:
        try:
            answer.append(os.stat(path))
        except OSError as exc:
            answer.append(exc)

    t = threading.Thread(target=probe, name="bench-stat-probe", daemon=True)
    t.start()
    t.join(max(0.0, timeout))
    return answer[0] if answer else None


def evict_mirrored(mountpoint: str | os.PathLike[str], backing_dir: str | os.PathLike[str]) -> None:
    """Drop the page cache of every file of a served directory: through the mount and in
    the backing directory the server reads (else the "storage" answers from memory).

    Regular files only; a file that cannot be opened (vanished through the mount) is
    skipped. ``posix_fadvise(DONTNEED)`` (`engine.evict`): pages some process maps stay.
    """
    for dirpath, _dirs, files in os.walk(backing_dir):
        for name in files:
            backing = os.path.join(dirpath, name)
            if not os.path.isfile(backing) or os.path.islink(backing):
                continue
            rel = os.path.relpath(backing, backing_dir)
            for target in (os.path.join(mountpoint, rel), backing):
                try:
                    evict(target)
                except OSError as exc:
                    log.debug("evict %s: %s", target, exc)
