"""loader_adapter: a safetensors weights iterator with a cooperative page-cache prefetch.

The iterator's names (which need torch and safetensors) are imported on first use, so
the torch-free parts (flags, rank discovery, files, filesystems, the header parser) can
be imported by tools that must stay light, such as a benchmark's orchestrator.

Example:
    >>> from loader_adapter import safetensors_weights_iterator
    >>> for name, tensor in safetensors_weights_iterator("/ckpt", prefetch="auto"):
    ...     params[name].copy_(tensor)  # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

from loader_adapter.args import add_prefetch_args, parse_window, prefetch_options_from_args
from loader_adapter.discovery import (
    HOST_ID_ENV,
    LocalRank,
    discover_local_rank,
    host_identity,
    local_rank_in_group,
)
from loader_adapter.files import expand_checkpoint_files
from loader_adapter.fsdetect import AutoDecision, decide_auto, filesystem_type
from loader_adapter.header import SafetensorsHeader, TensorSpan, read_header

if TYPE_CHECKING:
    from loader_adapter.cluster import (
        REPLICA_DIR_ENV,
        ClusterReport,
        ClusterWeightsIterator,
        cluster_weights_iterator,
    )
    from loader_adapter.iterator import (
        PrefetchMode,
        TensorFilter,
        WeightsIterator,
        load_state_dict,
        tensor_order,
    )
    from loader_adapter.load import safetensors_weights_iterator

__all__ = [
    # loading
    "PrefetchMode",
    "TensorFilter",
    "WeightsIterator",
    "load_state_dict",
    "safetensors_weights_iterator",
    # cluster scope
    "REPLICA_DIR_ENV",
    "ClusterReport",
    "ClusterWeightsIterator",
    "cluster_weights_iterator",
    # serving-engine flags
    "add_prefetch_args",
    "parse_window",
    "prefetch_options_from_args",
    # rank discovery
    "HOST_ID_ENV",
    "LocalRank",
    "discover_local_rank",
    "host_identity",
    "local_rank_in_group",
    # files and filesystems
    "AutoDecision",
    "decide_auto",
    "expand_checkpoint_files",
    "filesystem_type",
    # the safetensors header
    "SafetensorsHeader",
    "TensorSpan",
    "read_header",
    "tensor_order",
]

_ITERATOR_NAMES = frozenset(
    {"PrefetchMode", "TensorFilter", "WeightsIterator", "load_state_dict", "tensor_order"}
)


_LAZY = {
    **dict.fromkeys(_ITERATOR_NAMES, "loader_adapter.iterator"),
    "safetensors_weights_iterator": "loader_adapter.load",
    **dict.fromkeys(
        ("REPLICA_DIR_ENV", "ClusterWeightsIterator", "cluster_weights_iterator"),
        "loader_adapter.cluster",
    ),
    "ClusterReport": "loader_adapter.cluster",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loader_adapter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
