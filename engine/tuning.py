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
from dataclasses import dataclass

from engine.fstype import is_network_device, is_network_fs

__all__ = ["MAX_STREAMS_PER_RANK", "NODE_STREAMS", "Tuning", "auto_tuning", "max_streams"]

log = logging.getLogger(__name__)

#: Reads in flight per node that the automatic concurrency starts from (split among ranks).
NODE_STREAMS = 8
#: The most reads in flight per node that run-time adaptation may climb to.
MAX_NODE_STREAMS = 16
#: ... and per rank.
MAX_STREAMS_PER_RANK = 16
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


def max_streams(world: int) -> int:
    """The most reads in flight one of `world` local ranks may adapt to.

    Example:
        >>> max_streams(1), max_streams(4), max_streams(32)
        (16, 4, 1)
    """
    return max(1, min(MAX_STREAMS_PER_RANK, -(-MAX_NODE_STREAMS // world)))


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
