"""What kind of filesystem a file lives on: network/FUSE (latency-bound) or local.

The answer comes from ``statfs(2)``'s ``f_type`` (through ctypes). It picks the automatic
stripe size and concurrency (`engine.tuning`) and the loader's ``prefetch="auto"``.
"""

from __future__ import annotations

import ctypes
import os

from engine._libc import libc

__all__ = [
    "LOCAL_FILESYSTEMS",
    "NETWORK_FILESYSTEMS",
    "OVERLAYFS_MAGIC",
    "filesystem_type",
    "filesystem_type_fd",
    "is_network_fs",
]

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


#: statfs f_type of overlayfs: its page cache lives in the real (upper/lower) file.
OVERLAYFS_MAGIC = 0x794C7630


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux; f_type is the first field on every architecture.
    # The padding leaves room for the rest of the struct on any ABI.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


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
    buf = _Statfs()
    if libc.statfs(os.fsencode(os.fspath(path)), ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(path))
    return buf.f_type & 0xFFFFFFFF


def filesystem_type_fd(fd: int) -> int:
    """Return ``fstatfs(fd).f_type`` as an unsigned 32-bit magic number.

    Args:
        fd: an open file descriptor.

    Returns:
        The magic number of the filesystem the open file lives on.

    Raises:
        OSError: fstatfs failed.

    Example:
        >>> with open("/proc/self/status") as f:
        ...     hex(filesystem_type_fd(f.fileno()))
        '0x9fa0'
    """
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buf.f_type & 0xFFFFFFFF


#: Mount-table type names (``/proc/self/mountinfo``) of network, cluster and FUSE
#: filesystems, beside the statfs magics above. ``fuse.<name>`` and ``fuseblk`` are FUSE.
NETWORK_FSTYPE_NAMES = frozenset(
    {*NETWORK_FILESYSTEMS.values(), "nfs4", "smb3", "glusterfs", "virtiofs", "gfs2", "ocfs2"}
)


def is_network_fstype(name: str) -> bool:
    """Whether a mount-table type name is a network, cluster or FUSE filesystem.

    Example:
        >>> is_network_fstype("fuse.sshfs"), is_network_fstype("nfs4"), is_network_fstype("ext4")
        (True, True, False)
    """
    return name in NETWORK_FSTYPE_NAMES or name.startswith("fuse")


def is_network_device(dev: int) -> bool | None:
    """Whether the filesystem of device `dev` (``st_dev``) is a network or FUSE one, from
    the mount table alone: no request reaches the filesystem, so a stalled server cannot
    block the answer (``statfs`` on FUSE asks the server).

    Returns:
        True or False; None when no mount of this process has that device.

    Example:
        >>> is_network_device(os.stat("/proc").st_dev)
        False
    """
    from engine.mounts import read_mountinfo

    try:
        mounts = read_mountinfo()
    except OSError:
        return None
    for m in mounts:
        if m.device == dev:
            return is_network_fstype(m.fstype)
    return None


def is_network_fs(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is on a network, cluster or FUSE filesystem (see `NETWORK_FILESYSTEMS`).

    Args:
        path: any existing path.

    Returns:
        True for NFS, Lustre, GPFS, CIFS/SMB, CephFS, 9p, BeeGFS, FUSE and the like.

    Raises:
        OSError: statfs failed.

    Example:
        >>> is_network_fs("/proc")
        False
    """
    return filesystem_type(path) in NETWORK_FILESYSTEMS
