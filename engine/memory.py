"""How much page cache this process can really use, and the window that follows from it.

When a checkpoint is larger than the page cache a node or container can hold, warming all
of it evicts the first shards before the loader reaches them. The window keeps the warmed
bytes ahead of the loader below what fits. The budget is the smaller of:

- ``MemAvailable`` from ``/proc/meminfo`` (free memory plus reclaimable cache), and
- for each memory cgroup from this process's up to the root, its limit minus the memory
  it cannot reclaim (cgroup v1 ``memory.limit_in_bytes`` with ``total_rss`` +
  ``total_shmem`` from ``memory.stat``, which count its children too; v2 the smaller of
  ``memory.max`` and ``memory.high`` with ``anon`` + ``shmem``): page cache is charged to
  the cgroup that reads it.

A window alone does not bound the page cache: what the loader has consumed stays cached,
and the kernel reclaims it *last*. Measured in a 1 GiB memory cgroup (3 GiB checkpoint,
simulated slow NFS, 4 ranks in step, 0.5 GiB window): 600-950 MiB of the cgroup held bytes
that every rank had already consumed, 450-740 MiB of it on the active LRU list (reclaim
first met those pages while the four ranks' safetensors mappings still held them, so it
promoted them); ahead of the loader only 150-370 MiB stayed, with 200-340 MiB of holes
where warmed pages (unmapped, inactive) had been reclaimed first. The loader read those
again: 1.69x the checkpoint served, 24 s instead of 12. So with a window the engine also
drops what lies more than a *trail* (`trail_bytes`) behind the slowest local rank
(``posix_fadvise(DONTNEED)``, which drops the clean pages no process maps), and the loader
adapter unmaps the pages of tensors its caller has let go (`release_mapped`,
``madvise(MADV_DONTNEED)``) so that the drop can take them. The page cache the load needs
is then about trail + window (measured: at most 0.3 GiB there, 1.00x served, 12 s).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

from engine import _libc

__all__ = ["MemoryBudget", "auto_window", "memory_budget", "release_mapped", "trail_bytes"]

log = logging.getLogger(__name__)

#: A checkpoint fits "comfortably" when it needs at most this share of the budget.
FIT_FRACTION = 0.8
#: Otherwise the window is this share of the budget (the rest is for the loader and others).
WINDOW_FRACTION = 0.5
#: With a window, bytes further behind the consumer than this share of the window (at
#: least two stripe units per rank) are dropped: the trail covers ranks that lag behind.
TRAIL_FRACTION = 0.25
_MADV_DONTNEED = 4
_UNLIMITED = 1 << 60
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Bytes of page cache this process can count on, and where the figure comes from.

    Attributes:
        available_bytes: the budget (the smallest of the sources below).
        mem_available: ``MemAvailable`` of the machine.
        cgroup_limit: the tightest memory cgroup limit on the path, or None.
        cgroup_anon: anonymous memory charged to that cgroup, or None.
        source: ``"MemAvailable"`` or the cgroup directory that sets the budget.
    """

    available_bytes: int
    mem_available: int
    cgroup_limit: int | None
    cgroup_anon: int | None
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("MemAvailable missing from /proc/meminfo")


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> list[tuple[Path, str]]:
    """Directories of this process's memory cgroup and its ancestors, with their version."""
    out: list[tuple[Path, str]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, version = root / "memory", "v1"
        elif controllers == "" and (root / "cgroup.controllers").exists():
            base, version = root, "v2"
        else:
            continue
        rel_path = Path(rel.lstrip("/"))
        # Inside a cgroup namespace the mount may already be the process's own cgroup.
        start = base / rel_path if (base / rel_path).exists() else base
        d = start
        while True:
            out.append((d, version))
            if d == base:
                break
            d = d.parent
    return out


def memory_budget(
    *, proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = _CGROUP_ROOT,
    meminfo: Path = Path("/proc/meminfo"),
) -> MemoryBudget:  # fmt: skip
    """Measure the page cache this process can use (see the module's docstring).

    Args:
        proc_cgroup: the process's cgroup file (tests pass a fake tree).
        cgroup_root: where cgroup filesystems are mounted.
        meminfo: the meminfo file.

    Returns:
        A `MemoryBudget`.

    Example:
        >>> memory_budget().available_bytes > 0
        True
    """
    avail = _mem_available(meminfo)
    best = MemoryBudget(avail, avail, None, None, "MemAvailable")
    for d, version in _cgroup_dirs(proc_cgroup, cgroup_root):
        stat_file = d / "memory.stat"
        if version == "v1":
            limit = _read_int(d / "memory.limit_in_bytes")
            # total_*: this cgroup and its children (rss alone counts only its own tasks)
            rss = _stat_value(stat_file, "total_rss")
            if rss is None:
                rss = _stat_value(stat_file, "rss")
            shmem = _stat_value(stat_file, "total_shmem")
            if shmem is None:
                shmem = _stat_value(stat_file, "shmem")
        else:
            limits = [_read_int(d / "memory.max"), _read_int(d / "memory.high")]
            known = [v for v in limits if v is not None]
            limit = min(known) if known else None  # above memory.high the kernel reclaims
            rss = _stat_value(stat_file, "anon")
            shmem = _stat_value(stat_file, "shmem")
        # shmem (/dev/shm, tmpfs) is page cache that cannot be dropped: as good as anon
        anon = None if rss is None and shmem is None else (rss or 0) + (shmem or 0)
        if limit is None or limit >= _UNLIMITED or limit >= 1 << 62:
            continue
        room = max(0, limit - (anon or 0))
        if room < best.available_bytes:
            best = MemoryBudget(room, avail, limit, anon, str(d))
    return best


def auto_window(
    total_bytes: int, *, budget: MemoryBudget | None = None, min_bytes: int = 0
) -> tuple[int | None, str]:
    """Choose the window for a checkpoint of `total_bytes`: None when it fits comfortably.

    Args:
        total_bytes: bytes in the checkpoint (all files, all ranks).
        budget: the memory budget; measured now when None.
        min_bytes: the smallest window to return (e.g. two stripe units).

    Returns:
        ``(window_bytes or None, reason)``; the reason is one human-readable line.

    Example:
        >>> b = MemoryBudget(10 << 30, 10 << 30, None, None, "MemAvailable")
        >>> auto_window(4 << 30, budget=b)[0] is None
        True
        >>> auto_window(40 << 30, budget=b)[0] == 5 << 30
        True
    """
    b = budget or memory_budget()
    gib = 1 << 30
    where = f"{b.available_bytes / gib:.1f} GiB usable ({b.source})"
    if total_bytes <= FIT_FRACTION * b.available_bytes:
        return None, f"no window: the checkpoint ({total_bytes / gib:.1f} GiB) fits in {where}"
    window = max(int(WINDOW_FRACTION * b.available_bytes), min_bytes)
    return window, (
        f"window {window / gib:.2f} GiB = {WINDOW_FRACTION:.0%} of {where}: the checkpoint "
        f"({total_bytes / gib:.1f} GiB) does not fit"
    )


def trail_bytes(window_bytes: int, *, chunk_bytes: int, world: int) -> int:
    """How far behind the slowest local rank cached bytes are kept when a window is set.

    The drops follow the slowest rank's position (`engine.cursor.RankBoard`). The trail is
    a margin behind it: for the tensors a rank still holds (pages it maps are not dropped,
    and are not tried again), and, where no board can be made, for ranks that lag behind
    this one, whose own position then stands for the slowest's (all local ranks load the
    same tensors in the same order). Bytes dropped before a rank read them are read again.

    Args:
        window_bytes: the window.
        chunk_bytes: the stripe unit.
        world: local ranks.

    Returns:
        ``max(TRAIL_FRACTION * window_bytes, 2 * chunk_bytes * world)``.

    Example:
        >>> trail_bytes(512 << 20, chunk_bytes=16 << 20, world=4) == 128 << 20
        True
    """
    return max(int(TRAIL_FRACTION * window_bytes), 2 * chunk_bytes * world)


def release_mapped(address: int, length: int) -> bool:
    """Unmap the whole pages of ``[address, address + length)`` from this process only.

    ``madvise(MADV_DONTNEED)``: the page cache keeps the bytes; the next access to the range
    faults them in again from the file. For a private file mapping it also discards pages
    the process wrote to (copy-on-write), so call it only on ranges that nothing of the
    process can reach any more (the loader adapter checks that the tensors are gone).

    Args:
        address: start of the range (rounded up to a page).
        length: bytes in the range (its end is rounded down to a page).

    Returns:
        True when the kernel accepted the call (or the range holds no whole page).

    Example:
        >>> release_mapped(0, 0)
        True
    """
    page = _libc.PAGE_SIZE
    start = -(-address // page) * page
    end = (address + length) // page * page
    if end <= start:
        return True
    return _libc.libc.madvise(ctypes.c_void_p(start), end - start, _MADV_DONTNEED) == 0
