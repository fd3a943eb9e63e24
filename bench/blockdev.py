"""Block-device statistics: which disk holds a file, and how many sectors it has read."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["block_device", "sectors_read"]


def block_device(path: str | os.PathLike[str]) -> str | None:
    """The whole-disk block device (``vda``) holding `path`, or None (tmpfs, FUSE, ...).

    Follows st_dev to ``/sys/dev/block/MAJ:MIN``, and from a partition to its disk.

    Args:
        path: a file or directory.

    Returns:
        The device name under ``/sys/block``, or None.

    Example:
        >>> block_device("/")  # doctest: +SKIP
        'vda'
    """
    st = os.stat(path)
    sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not sys_dev.exists():
        return None
    real = sys_dev.resolve()
    if (real / "partition").exists():
        real = real.parent
    name = real.name
    return name if Path("/sys/block", name, "stat").exists() else None


def sectors_read(dev: str) -> int:
    """Sectors (512 bytes) read so far by the whole disk `dev` (``/sys/block/DEV/stat``).

    Args:
        dev: a name under ``/sys/block`` (from `block_device`).

    Returns:
        The cumulative count; the node's other processes count too.

    Example:
        >>> sectors_read("vda") >= 0  # doctest: +SKIP
        True
    """
    with open(f"/sys/block/{dev}/stat", encoding="ascii") as f:
        return int(f.read().split()[2])
