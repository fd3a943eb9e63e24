"""The public weights iterator: one entry point, the scope dispatched here once.

``scope="node"`` (`loader_adapter.iterator`): the node's local ranks share a page-cache
prefetch, each node reading the checkpoint once. ``scope="cluster"``
(`loader_adapter.cluster`): each byte read from storage once for the whole job, the rest
exchanged between nodes.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidOptionError
from loader_adapter.cluster import cluster_weights_iterator
from loader_adapter.files import CheckpointFiles
from loader_adapter.iterator import (
    PrefetchMode,
    TensorFilter,
    WeightsIterator,
    node_weights_iterator,
)
from loader_adapter.options import SCOPES, Scope

__all__ = ["safetensors_weights_iterator"]


def safetensors_weights_iterator(
    files: CheckpointFiles,
    *,
    prefetch: PrefetchMode = False,
    rank: int | None = None,
    world: int | None = None,
    scope: str = "node",
    tensors: TensorFilter | None = None,
    **prefetch_options: Any,
) -> WeightsIterator:
    """Iterate over a safetensors checkpoint's tensors, optionally prefetching the files.

    The tensors are those of ``safe_open(path, framework="pt").get_tensor(name)``:
    prefetch never changes them, and a failed prefetch only logs one warning. Files come
    in the engine's order (sorted by resolved path, or as given with ``order="given"``),
    the tensors of a file by offset. Use (copy) each tensor before asking for the next, as
    a serving engine does when it copies weights to the GPU: the prefetch window follows
    the loader's position. The prefetch starts when this function is called and is
    cancelled and joined when the iterator is exhausted, closed, garbage-collected, or
    raises. Errors about the files (missing file, corrupt header) are the same with and
    without prefetch.

    Args:
        files: ``.safetensors`` paths, a checkpoint directory, or a Hugging Face
            ``model.safetensors.index.json``.
        prefetch: False, True, or ``"auto"`` (on when the files are on a network or FUSE
            filesystem; logs its decision).
        rank: this process's local rank; None discovers it (``LOCAL_RANK``, then
            ``torch.distributed`` grouped by host, then 0). With torch.distributed, every
            rank must call this with the same `prefetch`.
        world: number of ranks on this node; None discovers it with `rank`.
        scope: ``"node"`` (each node reads the checkpoint from storage once) or
            ``"cluster"`` (each byte read from storage once for the whole job, the rest
            exchanged between nodes through ``torch.distributed``: see
            `loader_adapter.cluster.cluster_weights_iterator`, whose options ``replica_dir``,
            ``exchange_timeout_s``, ``setup_timeout_s`` and ``read_threads`` it then
            accepts; ranks come from the default process group, so `rank` and `world`
            must be None).
        tensors: the tensors this rank loads: a predicate on names, or a collection of
            names; None for all. Others are neither read nor yielded. With a prefetch,
            every local rank must pass one (``lambda name: True`` where a rank loads
            all): the ranks publish what they load, and the node warms only the union,
            each byte by one of the ranks that load it (expert parallelism: a rank's
            experts; pipeline parallelism: its stage's layers). In the cluster scope a
            stripe goes only to the nodes that need it.
        **prefetch_options: fields of `engine.PrefetchOptions` (``strategy``,
            ``backend``, ``concurrency``, ``chunk_bytes``, ``skip_cached``,
            ``window_bytes``, ``order``, ``progress``); only ``order`` matters without a
            prefetch. ``window_bytes`` defaults to ``"auto"`` here: no limit when the
            checkpoint fits in the page cache this process can use (MemAvailable, or its
            memory cgroup's room if smaller), else a window of half of that
            (`engine.auto_window`).

    Returns:
        A `WeightsIterator` of ``(name, tensor)`` (its ``report`` is the prefetch's
        report once the iteration has ended).

    Raises:
        OSError: a checkpoint file is missing or unreadable.
        ValueError: an invalid option, rank or world.
        TypeError: an unknown prefetch option.

    Example:
        >>> for name, tensor in safetensors_weights_iterator("/ckpt", prefetch="auto"):
        ...     model.load_weight(name, tensor.to("cuda"))  # doctest: +SKIP
    """
    if scope not in SCOPES:
        raise InvalidOptionError(f"scope must be 'node' or 'cluster', got {scope!r}")
    if scope == Scope.CLUSTER and prefetch is not False:
        if rank is not None or world is not None:
            raise InvalidOptionError(
                "scope='cluster' takes the ranks from torch.distributed: pass no rank or world"
            )
        return cluster_weights_iterator(
            files, prefetch=prefetch, tensors=tensors, **prefetch_options
        )
    return node_weights_iterator(
        files, prefetch=prefetch, rank=rank, world=world, tensors=tensors, **prefetch_options
    )
