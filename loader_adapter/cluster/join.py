"""Joining a cluster load: what each rank tells the others, and the job's decision. Pure.

Every rank gathers every rank's `MemberInfo` (and rank 0's settings) in one collective
(`loader_adapter.cluster.collective`) and calls `decide` on the same gathered list, so
every rank takes the same branch: cluster mode with its plan, or node-local mode with the
reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loader_adapter.cluster.plan import ClusterPlan, NodeRanges, Topology, cluster_plan

__all__ = [
    "NOTHING_SHARED",
    "ONE_NODE",
    "Joined",
    "MemberInfo",
    "agree",
    "decide",
    "node_needs",
]


#: `agree`'s answer when there is nothing to exchange (not a failure).
ONE_NODE = "all ranks are on one node"
#: Why a plan with needs is not run as a cluster load: no byte goes to two nodes (pipeline
#: stages share no tensor), so each node reads its own, as in node-local mode (not a failure).
NOTHING_SHARED = "no byte is loaded on more than one node: nothing to exchange"


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What one rank tells the others before cluster mode starts (gathered from every rank).

    Attributes:
        host: the rank's host identity.
        names: base names of the checkpoint files, in consumption order.
        sizes: their sizes.
        error: why this rank cannot take part (no replica directory, no room, ...), or None.
        needs: the byte ranges this rank loads, ``(file index, start, end)``; None: all.
    """

    host: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    error: str | None = None
    needs: tuple[tuple[int, int, int], ...] | None = None


def node_needs(infos: Sequence[MemberInfo], topology: Topology) -> list[NodeRanges]:
    """What each node loads: the union of its ranks' `MemberInfo.needs` (None where one of
    them loads everything), in node order, for `cluster_plan`.

    Example:
        >>> a = MemberInfo("a", ("m",), (100,), needs=((0, 0, 10),))
        >>> b = MemberInfo("b", ("m",), (100,))
        >>> node_needs([a, b, a], Topology.from_hosts(["a", "b", "a"]))
        [{0: [(0, 10), (0, 10)]}, None]
    """
    out: list[NodeRanges] = []
    for ranks in topology.nodes:
        if any(infos[r].needs is None for r in ranks):
            out.append(None)
            continue
        need: dict[int, list[tuple[int, int]]] = {}
        for r in ranks:
            for file, start, end in infos[r].needs or ():
                need.setdefault(file, []).append((start, end))
        out.append(need)
    return out


def agree(infos: Sequence[MemberInfo]) -> str | None:
    """The job's decision from every rank's `MemberInfo`: None for cluster mode, else why not.

    Every rank computes it from the same gathered list, so every rank takes the same branch.

    Example:
        >>> a = MemberInfo("a", ("m.safetensors",), (10,))
        >>> agree([a, MemberInfo("b", ("m.safetensors",), (10,))]) is None
        True
        >>> agree([a, MemberInfo("b", ("m.safetensors",), (11,))])
        'rank 1 sees different checkpoint files than rank 0'
    """
    if not infos:
        return "no ranks"
    for rank, info in enumerate(infos):
        if info.error is not None:
            return f"rank {rank} ({info.host}) cannot take part: {info.error}"
    first = infos[0]
    for rank, info in enumerate(infos[1:], start=1):
        if (info.names, info.sizes) != (first.names, first.sizes):
            return f"rank {rank} sees different checkpoint files than rank 0"
    if len({info.host for info in infos}) < 2:
        return ONE_NODE
    return None


@dataclass(frozen=True)
class Joined:
    """The job's decision: cluster mode with its plan, or node-local mode with the reason.

    Attributes:
        reason: why not cluster mode (empty in cluster mode).
        hosts: the host identity of each global rank (empty when nothing was gathered).
        plan: the plan (None: node-local mode).
        nonce: rank 0's random name part of this load's replica.
        max_tensor_bytes: the checkpoint's largest tensor (0 when not asked for).
        group: the gloo group the exchange uses.
    """

    reason: str
    hosts: tuple[str, ...] = ()
    plan: ClusterPlan | None = None
    nonce: str = ""
    max_tensor_bytes: int = 0
    group: Any = None


def decide(gathered: Sequence[tuple[MemberInfo, Mapping[str, Any]]]) -> Joined:
    """The job's decision from every rank's ``(MemberInfo, extra)``, in rank order.

    Rank 0's extra holds ``nonce`` and ``chunk_bytes`` (and ``max_tensor_bytes`` when
    windowed); a rank that loads part of the checkpoint sends ``header_ends`` (where each
    file's tensor data starts). When no tensor data goes to two nodes, every rank loads
    node-local (`NOTHING_SHARED`).

    Example:
        >>> a, b = MemberInfo("a", ("m",), (8192,)), MemberInfo("b", ("m",), (8192,))
        >>> j = decide([(a, {"nonce": "x", "chunk_bytes": 4096}), (b, {})])
        >>> j.reason, len(j.plan.stripes)
        ('', 2)
    """
    infos = [g[0] for g in gathered]
    hosts = tuple(i.host for i in infos)
    reason = agree(infos)
    if reason is not None:
        return Joined(reason, hosts)
    first = gathered[0][1]
    plan = cluster_plan(
        infos[0].sizes, hosts, chunk_bytes=first["chunk_bytes"],
        node_needs=node_needs(infos, Topology.from_hosts(hosts)),
    )  # fmt: skip
    ends = next((g[1]["header_ends"] for g in gathered if "header_ends" in g[1]), None)
    if ends is not None and not any(
        s.receivers and s.offset + s.length > ends[s.file] for s in plan.stripes
    ):
        return Joined(NOTHING_SHARED, hosts)
    return Joined("", hosts, plan, first["nonce"], first.get("max_tensor_bytes", 0))
