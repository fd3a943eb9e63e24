"""Automatic stripe size and concurrency, from the filesystem and the number of ranks.

Measured with `ckpt-prefetch-bench` on this project's 2-core VM (512 MiB checkpoints,
cold cache; figures in the README):

- Network filesystems are latency-bound: one stream gets one read-ahead window per round
  trip. About 8 streams per node reach the simulated link's bandwidth (slow-nfs, 1 rank:
  8 x 16 MiB 1.00x the floor, 2 x 16 MiB 1.80x); more streams per rank than that only
  add CPU beside the ranks' parsing (4 ranks: 2 per rank 1.04x, 8 per rank 1.13-1.29x).
  Stripes of 16 MiB keep the front of the prefetch close to the loader.
- Local block devices with a large read-ahead (8 MiB here) pay for every stripe boundary
  that parallel streams share: 64 MiB stripes cost 0.035-0.046 CPU-s/GB, 16 MiB
  0.08-0.10, 4 MiB 0.18-0.23, at the same throughput.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from engine.fstype import is_network_device, is_network_fs

__all__ = [
    "HARD_NODE_STREAMS",
    "NODE_STREAMS",
    "Tuning",
    "auto_tuning",
    "max_streams",
    "stream_limit",
]

log = logging.getLogger(__name__)

#: Reads in flight per node that the automatic concurrency starts from (split among ranks).
NODE_STREAMS = 8
#: The most reads in flight per node that run-time adaptation may climb to, whatever the
#: node's resources: a bound for safety, not a figure measured here (a Lustre client on an
#: H100 node needs about 32 streams for 8.5 GiB/s; 256 leaves room for storage that needs
#: far more, while a runaway controller cannot open thousands of reads at a server).
HARD_NODE_STREAMS = 256
#: Descriptors one stream may hold: a reader thread keeps up to 8 files open, and /dev/null.
FDS_PER_STREAM = 9
#: Share of the process's descriptor limit that the prefetch's streams may take.
FD_SHARE = 0.5
#: Memory one stream may hold in flight (a buffered backend reads at least this much).
BYTES_PER_STREAM = 4 << 20
#: Share of the node's available memory that reads in flight may hold.
MEMORY_SHARE = 1 / 64
NETWORK_CHUNK_BYTES = 16 << 20
LOCAL_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Tuning:
    """The stripe size and concurrency chosen for one prefetch, and why.

    Attributes:
        chunk_bytes: the stripe unit.
        concurrency: reads in flight (where `max_concurrency` is set: the first value of
            the run-time adaptation, `engine.adapt`).
        reason: why, in words.
        max_concurrency: the most reads in flight adaptation may choose; None: fixed.
        network: the files are on a network or FUSE filesystem.
    """

    chunk_bytes: int
    concurrency: int
    reason: str
    max_concurrency: int | None = None
    network: bool = False


def _nofile() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stream_limit(
    world: int, *, nofile: int | None = None, mem_available: int | None = None
) -> tuple[int, str]:
    """The most reads in flight one of `world` local ranks may adapt to, and why.

    Derived from resources, not from a stream count measured on one machine: the
    descriptors of one rank's process (each stream may hold `FDS_PER_STREAM`; the streams
    take at most `FD_SHARE` of the limit), the node's memory (each stream may hold
    `BYTES_PER_STREAM`; all of them at most `MEMORY_SHARE` of what is available), and
    `HARD_NODE_STREAMS` for safety, the node's bounds split among its ranks.

    Args:
        world: local ranks.
        nofile: the descriptor limit (None: this process's ``RLIMIT_NOFILE``).
        mem_available: the node's available memory (None: ``MemAvailable``).

    Returns:
        (streams per rank, >= 1; the bound that decided, in words).

    Example:
        >>> stream_limit(1, nofile=1024, mem_available=24 << 30)
        (56, 'descriptors: 1024 x 0.5 / 9 per stream')
        >>> stream_limit(8, nofile=1 << 20, mem_available=1 << 40)
        (32, 'safety bound: 256 per node')
    """
    nofile = _nofile() if nofile is None else nofile
    mem = _mem_available() if mem_available is None else mem_available
    world = max(1, world)
    bounds = [
        (-(-HARD_NODE_STREAMS // world), f"safety bound: {HARD_NODE_STREAMS} per node"),
        (
            int(nofile * FD_SHARE) // FDS_PER_STREAM,
            f"descriptors: {nofile} x {FD_SHARE} / {FDS_PER_STREAM} per stream",
        ),
    ]
    if mem:
        per_node = int(mem * MEMORY_SHARE) // BYTES_PER_STREAM
        bounds.append(
            (per_node // world, f"memory: {mem >> 20} MiB available x {MEMORY_SHARE:.3g}")
        )
    n, why = min(bounds, key=lambda b: b[0])
    return max(1, n), why


def max_streams(world: int) -> int:
    """The most reads in flight one of `world` local ranks may adapt to (`stream_limit`).

    Example:
        >>> max_streams(1) >= max_streams(4) >= max_streams(4096) == 1
        True
    """
    return stream_limit(world)[0]


def auto_tuning(
    path: str | os.PathLike[str] | None, world: int, *, dev: int | None = None
) -> Tuning:
    """Choose stripe size and per-rank concurrency for a checkpoint whose files include `path`.

    Args:
        path: one of the checkpoint's files (its filesystem decides the stripe size);
            None when there is none (an empty plan).
        world: number of local ranks; the node's `NODE_STREAMS` are split among them.
        dev: the file's ``st_dev`` when known: the mount table then tells the filesystem
            without asking it (``statfs`` is the fallback, and on FUSE it waits for the
            server).

    Returns:
        A `Tuning`.

    Example:
        >>> t = auto_tuning("/proc/self/status", 4)
        >>> t.concurrency, t.chunk_bytes >> 20
        (2, 64)
    """
    concurrency = max(1, -(-NODE_STREAMS // world))
    network = is_network_device(dev) if dev is not None else None
    if network is None:
        try:
            network = path is not None and is_network_fs(path)
        except OSError:
            network = False
    if network:
        chunk, kind = NETWORK_CHUNK_BYTES, "network/FUSE filesystem"
    else:
        chunk, kind = LOCAL_CHUNK_BYTES, "local filesystem"
    reason = (
        f"auto: {kind} -> {chunk >> 20} MiB stripes; {NODE_STREAMS} streams per node / "
        f"{world} ranks -> {concurrency} per rank"
    )
    return Tuning(chunk, concurrency, reason, network=network)
