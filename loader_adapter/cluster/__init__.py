"""Cluster mode: each byte of the checkpoint read from shared storage once for the whole job.

The stripes of the checkpoint are split among the nodes and among each node's ranks
(`plan`). Each rank reads its stripes from storage into its node's replica
(`replica`), sends each one to one rank of every other node through
``torch.distributed`` point-to-point messages (gloo), and receives its share of the other
nodes' stripes into the replica. The loader reads the replica's files with ``safe_open``
and yields a tensor only once every stripe under it is ready, so the tensors are exactly
those of ``safetensors.torch.load_file`` on the original files. ``docs/cluster.md`` has the
design: where bytes live, the ready map, the exchange schedule, faults and limits.

Collective and symmetric: every rank of the default process group calls
`cluster_weights_iterator` with the same files and options. One collective decides (an
``all_gather_object`` on a gloo group with a timeout): every rank takes the same branch,
cluster mode or node-local mode (`loader_adapter.safetensors_weights_iterator` with
prefetch, local ranks taken from the same gathered host list, no further collective).
After that only point-to-point messages run, each with a timeout: a peer that dies or
stalls is given up, the stripes it owed are read from storage by the node that needed
them, and the report says so.

The package, from the pure core out:

* `plan`: which rank reads each stripe and who sends it to whom (no I/O);
* `join`: what each rank tells the others, and the job's decision (no I/O);
* `machine`: one rank's stripe state machine, events in, actions out (no I/O);
* `replica`: the node's replica and its shared ready map (no torch);
* `storage`, `transport`: reading stripes from storage, moving them between ranks (the
  `Transport` protocol; gloo's imports torch when it first sends);
* `core`, `reads`, `transfers`, `exchange`: the threads that carry out the machine's
  actions (the machine under one lock; the readers; the poster and the completer; the
  repairs, the loader's side and the lifecycle);
* `collective`, `iterator`, `report`: the one collective, the iterator, the report.

Only `iterator` and `collective` import torch; the names below are imported on first
use.

Example:
    >>> dist.init_process_group("gloo")  # doctest: +SKIP
    >>> with cluster_weights_iterator("/nfs/ckpt") as it:  # doctest: +SKIP
    ...     for name, tensor in it:
    ...         params[name].copy_(tensor)
    ...     print(it.report)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader_adapter.cluster.iterator import (
        DEFAULT_REPLICA_DIR,
        REPLICA_DIR_ENV,
        ClusterWeightsIterator,
        cluster_weights_iterator,
    )
    from loader_adapter.cluster.report import ClusterReport

__all__ = [
    "DEFAULT_REPLICA_DIR",
    "REPLICA_DIR_ENV",
    "ClusterReport",
    "ClusterWeightsIterator",
    "cluster_weights_iterator",
]


def __getattr__(name: str) -> Any:
    if name == "ClusterReport":
        from loader_adapter.cluster.report import ClusterReport

        return ClusterReport
    if name in __all__:
        from loader_adapter.cluster import iterator

        return getattr(iterator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
