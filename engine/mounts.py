"""Mounts and the devices behind them: the mount table and a device's read-ahead window.

``/proc/self/mountinfo`` escapes space, tab, newline and backslash in its fields as a
backslash and three octal digits of one *byte* (``\\040`` is a space; ``\\351`` is the
byte 0xE9, one byte of a UTF-8 or Latin-1 name). Fields are therefore read as bytes,
unescaped byte by byte and decoded with `os.fsdecode`, so that a mount point compares
equal to the same path as `os.path.realpath` returns it, whatever its encoding.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = [
    "MOUNTINFO",
    "Mount",
    "mount_of",
    "mount_points",
    "parse_mountinfo",
    "read_ahead_bytes",
    "read_ahead_kb",
    "read_ahead_path",
    "read_mountinfo",
    "unescape_mount_field",
]

#: This process's mount table.
MOUNTINFO = "/proc/self/mountinfo"
#: The read-ahead the kernel uses where a device does not say (``VM_READAHEAD_PAGES``).
DEFAULT_READ_AHEAD_BYTES = 128 << 10
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of ``/proc/self/mountinfo``, unescaped.

    Attributes:
        mount_point: where it is mounted, as `os.path.realpath` spells paths under it.
        fstype: the filesystem type (``"ext4"``, ``"fuse.sshfs"``, ``"nfs4"``).
        source: what is mounted (``"/dev/vda1"``, ``"server:/export"``, ``"none"``).
        root: the directory of the filesystem that is mounted there (``"/"`` usually).
        device: ``st_dev`` of files on this mount (`os.makedev` of the major:minor field).
        options: the per-mount options (``"rw,relatime"``).
    """

    mount_point: str
    fstype: str
    source: str
    root: str = "/"
    device: int = 0
    options: str = ""

    def contains(self, path: str) -> bool:
        """Whether the absolute, resolved `path` lies on or under this mount point."""
        mp = self.mount_point
        return path == mp or path.startswith(mp.rstrip("/") + "/")


def unescape_mount_field(field: bytes) -> str:
    """Undo mountinfo's octal escapes byte by byte, then decode as a file name.

    Example:
        >>> unescape_mount_field(rb"/mnt/my\\040disk")
        '/mnt/my disk'
        >>> unescape_mount_field(rb"/caf\\303\\251")
        '/café'
    """
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def _parse_line(line: bytes) -> Mount | None:
    left, sep, right = line.rstrip(b"\n").partition(b" - ")
    fields, tail = left.split(b" "), right.split(b" ")
    if not sep or len(fields) < 6 or len(tail) < 2:
        return None
    major, _, minor = fields[2].partition(b":")
    try:
        device = os.makedev(int(major), int(minor))
    except ValueError:
        device = 0
    return Mount(
        mount_point=unescape_mount_field(fields[4]),
        fstype=unescape_mount_field(tail[0]),
        source=unescape_mount_field(tail[1]),
        root=unescape_mount_field(fields[3]),
        device=device,
        options=unescape_mount_field(fields[5]),
    )


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Parse the text of a mountinfo file; malformed lines are left out.

    Args:
        data: the file's bytes.

    Returns:
        The mounts in the file's order (a later mount on the same point hides an earlier).

    Example:
        >>> line = b"36 35 98:0 / /mnt/a\\\\040b rw,noatime shared:1 - ext4 /dev/vda1 rw\\n"
        >>> m = parse_mountinfo(line)[0]
        >>> m.mount_point, m.fstype, m.source
        ('/mnt/a b', 'ext4', '/dev/vda1')
    """
    mounts = (_parse_line(line) for line in data.splitlines())
    return [m for m in mounts if m is not None]


def read_mountinfo(path: str = MOUNTINFO) -> list[Mount]:
    """The mounts of this process's mount namespace.

    Raises:
        OSError: the file cannot be read.

    Example:
        >>> any(m.mount_point == "/" for m in read_mountinfo())
        True
    """
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def mount_points(path: str = MOUNTINFO) -> set[str]:
    """The mount points of this process's mount namespace (no path is stat'ed).

    Unlike `os.path.ismount`, this never touches the mount itself, so it neither hangs on
    a stalled server nor fails on a dead one.

    Raises:
        OSError: the mount table cannot be read.

    Example:
        >>> "/" in mount_points()
        True
    """
    return {m.mount_point for m in read_mountinfo(path)}


def mount_of(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> Mount | None:
    """The mount that holds `path`: the longest mount point containing ``realpath(path)``.

    Args:
        path: any path (resolved with `os.path.realpath` first).
        mounts: the mount table (`read_mountinfo` when None).

    Returns:
        The mount (of several on one point, the last mounted), or None when the mount
        table cannot be read or has no mount that contains the path.

    Example:
        >>> mount_of("/proc/self").fstype
        'proc'
    """
    real = os.path.realpath(path)
    if mounts is None:
        try:
            mounts = read_mountinfo()
        except OSError:
            return None
    best: Mount | None = None
    for m in mounts:
        if m.contains(real) and (best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


def read_ahead_path(dev: int) -> str:
    """The sysfs file of the read-ahead window, in KiB, of device `dev` (``st_dev``).

    Every filesystem has one (its backing device info, ``bdi``); root may write it.

    Example:
        >>> read_ahead_path(os.makedev(8, 0))
        '/sys/class/bdi/8:0/read_ahead_kb'
    """
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"


def read_ahead_kb(dev: int) -> int | None:
    """The read-ahead window in KiB that the kernel uses for device `dev`, as it has it.

    Looks at the backing device info first, then at the block device's queue (and, for a
    partition, at its disk's). 0 means read-ahead is off.

    Args:
        dev: a device number (``os.stat(path).st_dev``).

    Returns:
        The window in KiB, or None when no sysfs file tells.

    Example:
        >>> kb = read_ahead_kb(os.stat("/").st_dev)
        >>> kb is None or kb >= 0
        True
    """
    major, minor = os.major(dev), os.minor(dev)
    for path in (
        read_ahead_path(dev),
        f"/sys/dev/block/{major}:{minor}/queue/read_ahead_kb",
        f"/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb",
    ):
        # Bytes, so no codec is imported: a process that dropped its privileges after
        # starting may no longer reach the standard library's `encodings` package.
        try:
            with open(path, "rb") as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def read_ahead_bytes(dev: int) -> int:
    """The read-ahead window of device `dev` in bytes (128 KiB when unknown or off).

    Example:
        >>> read_ahead_bytes(os.stat("/").st_dev) >= 4096
        True
    """
    kb = read_ahead_kb(dev)
    return kb << 10 if kb else DEFAULT_READ_AHEAD_BYTES
