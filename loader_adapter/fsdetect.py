"""What filesystem a checkpoint lives on, and whether ``prefetch="auto"`` turns prefetch on.

The decision comes from ``statfs(2)``'s ``f_type`` (called through ctypes): network and
FUSE filesystems (where every page fault is a round trip to a server) get prefetch; local
disks, tmpfs and unknown filesystems do not. ``/proc/self/mountinfo`` supplies the mount's
type name for the log line (``fuse.sshfs`` says more than ``fuse``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import memory_budget
from engine.fstype import LOCAL_FILESYSTEMS, NETWORK_FILESYSTEMS, filesystem_type
from engine.mounts import mount_of

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
    mount = mount_of(path)
    return mount.fstype if mount is not None else None


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
