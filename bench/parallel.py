"""Which tensors each rank loads under expert or pipeline parallelism, for the bench.

A job served across nodes with expert parallelism (EP) gives each rank a block of the
experts; with pipeline parallelism (PP) each node holds one stage, a block of the layers.
The rules follow vLLM's: experts are dealt in contiguous blocks (``placement="linear"``
of ``compute_local_expert_ids``), a tensor is an expert's when its name holds
``.experts.<id>.``, every other tensor is needed by every EP rank; a PP stage takes an
even share of the layers (the first stages one more when they do not divide), the
embedding goes to the first stage and the tensors outside the layers to the last.

The bench's nodes are posed as `bench.cluster_sim` poses them: global rank ``r`` is on
node ``r % nodes``.

Example:
    >>> split = Split("ep", nodes=2, ranks_per_node=2)
    >>> keep = split.keeps(rank=1, layers=4, experts=8)
    >>> [keep(f"model.layers.0.mlp.experts.{e}.up_proj.weight") for e in (1, 2, 3, 4)]
    [False, True, True, False]
    >>> keep("model.embed_tokens.weight")
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.needs import normalize, union_bytes
from loader_adapter.header import read_header

__all__ = ["SPLITS", "Split", "expert_of", "layer_of", "local_experts", "model_shape",
           "node_needed_bytes", "stage_layers"]  # fmt: skip

#: The kinds of split the bench poses.
SPLITS: tuple[str, ...] = ("ep", "pp")

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def expert_of(name: str) -> int | None:
    """The expert id in a tensor's name, or None for a tensor that is not an expert's."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def layer_of(name: str) -> int | None:
    """The layer index in a tensor's name, or None for a tensor outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def model_shape(names: Iterable[str]) -> tuple[int, int]:
    """(layers, experts) of a checkpoint from its tensor names (0 where there are none)."""
    layers = experts = 0
    for name in names:
        layer, expert = layer_of(name), expert_of(name)
        if layer is not None:
            layers = max(layers, layer + 1)
        if expert is not None:
            experts = max(experts, expert + 1)
    return layers, experts


def _block(count: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous blocks of ``range(count)``, the first ones
    one longer when `parts` does not divide `count`."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def local_experts(experts: int, ep_size: int, ep_rank: int) -> range:
    """The experts an EP rank owns: vLLM's linear placement.

    Example:
        >>> list(local_experts(10, 4, 1))
        [3, 4, 5]
    """
    return _block(experts, ep_size, ep_rank)


def stage_layers(layers: int, stages: int, stage: int) -> range:
    """The layers of one PP stage.

    Example:
        >>> list(stage_layers(5, 2, 1))
        [3, 4]
    """
    return _block(layers, stages, stage)


@dataclass(frozen=True)
class Split:
    """An EP or PP job of `nodes` × `ranks_per_node` ranks.

    EP spans every rank of every node (``ep_size = nodes * ranks_per_node``); PP has one
    stage per node, whose ranks all load that stage (tensor parallelism inside the node
    reads whole tensors and keeps its slice).
    """

    kind: str
    nodes: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.kind not in SPLITS:
            raise ValueError(f"unknown split {self.kind!r}; valid: {', '.join(SPLITS)}")
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ValueError(f"nodes and ranks per node must be >= 1: {self}")

    @property
    def world(self) -> int:
        """Ranks in the job."""
        return self.nodes * self.ranks_per_node

    def node_of(self, rank: int) -> int:
        """The node global rank `rank` runs on."""
        return rank % self.nodes

    def expert_ids(self, rank: int, experts: int) -> set[int] | None:
        """The experts `rank` loads (None: all; only EP filters experts)."""
        if self.kind != "ep" or self.world == 1:
            return None
        return set(local_experts(experts, self.world, rank))

    def keeps(self, *, rank: int, layers: int, experts: int) -> Callable[[str], bool]:
        """A predicate on tensor names: True for the tensors `rank` loads."""
        if self.kind == "ep":
            own = self.expert_ids(rank, experts)
            if own is None:
                return lambda name: True
            return lambda name: (e := expert_of(name)) is None or e in own
        stage = self.node_of(rank)
        mine = stage_layers(layers, self.nodes, stage)
        first, last = stage == 0, stage == self.nodes - 1

        def keep(name: str) -> bool:
            layer = layer_of(name)
            if layer is not None:
                return layer in mine
            return first if "embed" in name else last

        return keep


def node_needed_bytes(split: Split, files: Sequence[str]) -> list[int]:
    """Bytes each node's ranks load: the union over its ranks of each file's header and
    the data of the tensors they keep (what an ideal node reads from storage).

    Args:
        split: the job.
        files: the checkpoint's safetensors files (read here: their headers only).

    Returns:
        One figure per node, in node order.
    """
    headers = {f: read_header(f) for f in files}
    sizes = {f: os.path.getsize(f) for f in files}
    layers, experts = model_shape(t.name for h in headers.values() for t in h.tensors)
    out = []
    for node in range(split.nodes):
        per_rank = []
        for rank in range(node, split.world, split.nodes):
            keep = split.keeps(rank=rank, layers=layers, experts=experts)
            regions = {
                f: [(0, h.data_start), *((t.start, t.end) for t in h.tensors if keep(t.name))]
                for f, h in headers.items()
            }
            per_rank.append(normalize(regions, sizes))
        out.append(union_bytes(per_rank, sizes))
    return out
