"""The cluster planner: which rank of the job reads each stripe, and who sends it to whom.

Pure, like `engine.plan`: it takes file sizes and the host of every global rank and
returns stripes and per-rank exchange schedules; it opens no file and imports no torch.

The checkpoint's files, concatenated in consumption order, are cut into stripe units of
`chunk_bytes` (the same units as `engine.plan`'s balanced strategy; a unit that spans two
files gives one stripe per file). Unit ``u`` is read from storage by node ``u mod N`` (of
N nodes), by that node's local rank ``(u // N) mod L`` (of its L ranks): every byte is read
from storage once for the whole job, the nodes advance through the checkpoint together in
the loader's order, and each node reads 1/N of it. Every other node receives the stripe
from the reader, into the local rank ``(u // N) mod L'`` of its own L' ranks, so receiving
is spread over the local ranks as evenly as reading.

With `node_needs` (expert or pipeline parallelism: a node loads part of the checkpoint),
only bytes some node needs are planned: each unit is cut to the runs that at least one
node needs, a piece is read by one of the nodes that need it (round-robin over those, by
unit) and sent only to the other nodes that need it. A needed byte is still read from
storage once for the whole job; a byte no node needs is never read.

Each rank's exchange schedule lists its sends and receives in one global order, by stripe
and then by receiving node. Every pair of ranks meets its messages in the same order on
both sides, and an operation waits only on operations earlier in that order, so ranks
that post them in order (with any number in flight) never deadlock (``tests/
test_cluster_plan.py`` runs the schedules under rendezvous semantics to check it).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.errors import InvalidOptionError
from engine.plan import DEFAULT_CHUNK_BYTES, check_chunk_bytes, needed_segments, plan

__all__ = [
    "ClusterPlan",
    "NodeRanges",
    "Op",
    "OpKind",
    "Stripe",
    "Topology",
    "cluster_plan",
]


@dataclass(frozen=True, slots=True)
class Topology:
    """Which node each global rank is on, and its local rank there.

    Nodes are numbered in the order their first rank appears among the global ranks;
    a rank's local rank is its position among the ranks of its host, in global rank
    order (the rule of `loader_adapter.discovery`).

    Attributes:
        hosts: the host identity of each global rank.
        nodes: the global ranks of each node, ascending.
        node_of: the node of each global rank.
        local_rank_of: the local rank of each global rank.
    """

    hosts: tuple[str, ...]
    nodes: tuple[tuple[int, ...], ...]
    node_of: tuple[int, ...]
    local_rank_of: tuple[int, ...]

    @classmethod
    def from_hosts(cls, hosts: Sequence[str]) -> Topology:
        """Group global ranks by host identity.

        Example:
            >>> Topology.from_hosts(["a", "b", "a", "b"]).nodes
            ((0, 2), (1, 3))
        """
        if not hosts:
            raise InvalidOptionError("a topology needs at least one rank")
        index: dict[str, int] = {}
        members: list[list[int]] = []
        node_of: list[int] = []
        local: list[int] = []
        for rank, host in enumerate(hosts):
            n = index.setdefault(str(host), len(members))
            if n == len(members):
                members.append([])
            local.append(len(members[n]))
            members[n].append(rank)
            node_of.append(n)
        return cls(
            tuple(str(h) for h in hosts),
            tuple(tuple(m) for m in members),
            tuple(node_of),
            tuple(local),
        )

    @property
    def world(self) -> int:
        """Number of global ranks."""
        return len(self.hosts)

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def local_world(self, node: int) -> int:
        """Number of ranks on `node`."""
        return len(self.nodes[node])


@dataclass(frozen=True, slots=True)
class Stripe:
    """One piece of one file, read from storage by one rank and sent to the other nodes.

    Attributes:
        index: position in the plan's stripes (also the message tag of its exchange).
        file: index of the file in consumption order.
        offset: first byte within the file.
        length: bytes (> 0, at most the stripe unit).
        position: first byte on the concatenated axis.
        unit: the stripe unit it belongs to (``position // chunk_bytes``).
        reader: the global rank that reads it from storage.
        receivers: one global rank per other node that needs it, in node order.
        nodes: the nodes that need it, in order (the reader's among them); None: all.
    """

    index: int
    file: int
    offset: int
    length: int
    position: int
    unit: int
    reader: int
    receivers: tuple[int, ...]
    nodes: tuple[int, ...] | None = None

    @property
    def end(self) -> int:
        """Position just past the stripe's last byte."""
        return self.position + self.length


class OpKind(str, enum.Enum):
    """One side of one stripe's transfer."""

    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True, slots=True)
class Op:
    """One exchange operation of one rank: send stripe `stripe` to, or receive it from, `peer`.

    The message tag is the stripe's index: unique per pair of ranks, the same on both sides.
    """

    stripe: int
    kind: OpKind
    peer: int


@dataclass(frozen=True)
class ClusterPlan:
    """Every stripe of the checkpoint with its reader and receivers; see `cluster_plan`.

    Attributes:
        topology: the job's nodes.
        sizes: file sizes in consumption order.
        chunk_bytes: the stripe unit.
        stripes: all stripes by position.
        file_starts: position of each file's first byte.
    """

    topology: Topology
    sizes: tuple[int, ...]
    chunk_bytes: int
    stripes: tuple[Stripe, ...]
    file_starts: tuple[int, ...]
    _positions: tuple[int, ...] = field(repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes in the checkpoint."""
        return sum(self.sizes)

    def reads(self, rank: int) -> list[Stripe]:
        """The stripes `rank` reads from storage, in consumption order."""
        return [s for s in self.stripes if s.reader == rank]

    def needed_by(self, stripe: Stripe, node: int) -> bool:
        """Whether `node` needs `stripe` (every node does unless the plan had needs)."""
        return stripe.nodes is None or node in stripe.nodes

    def holder(self, stripe: Stripe, node: int) -> int:
        """The global rank that brings `stripe` into `node`'s replica (reader or receiver).

        Raises:
            ValueError: `node` does not need `stripe`.
        """
        reader_node = self.topology.node_of[stripe.reader]
        if reader_node == node:
            return stripe.reader
        nodes = range(self.topology.num_nodes) if stripe.nodes is None else stripe.nodes
        others = [m for m in nodes if m != reader_node]
        return stripe.receivers[others.index(node)]

    def schedule(self, rank: int) -> list[Op]:
        """The exchange operations of `rank` in the global order (stripe, receiving node)."""
        ops: list[Op] = []
        for s in self.stripes:
            if s.reader == rank:
                ops.extend(Op(s.index, OpKind.SEND, r) for r in s.receivers)
            elif rank in s.receivers:
                ops.append(Op(s.index, OpKind.RECV, s.reader))
        return ops

    def covering(self, position: int, end: int) -> range:
        """Indices of the stripes that overlap ``[position, end)`` on the concatenated axis.

        Example:
            >>> p = cluster_plan([10000], ["a"], chunk_bytes=4096)
            >>> list(p.covering(4000, 4100))
            [0, 1]
        """
        if end <= position:
            return range(0)
        lo = bisect.bisect_right(self._positions, position) - 1
        hi = bisect.bisect_left(self._positions, end)
        return range(max(lo, 0), hi)


#: A node's needs for `cluster_plan`: byte ranges ``[start, end)`` per file index
#: (a file not in it: all of it, as `engine.plan.plan` reads needs); None: the whole
#: checkpoint.
NodeRanges = Mapping[int, Sequence[tuple[int, int]]] | None


def _clip(
    segments: Sequence[tuple[int, int, tuple[int, ...]]], start: int, end: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """The parts of `segments` (sorted, disjoint) inside ``[start, end)``."""
    first = bisect.bisect_right([hi for _, hi, _ in segments], start)
    out = []
    for lo, hi, who in segments[first:]:
        if lo >= end:
            break
        out.append((max(lo, start), min(hi, end), who))
    return out


def cluster_plan(
    sizes: Sequence[int],
    hosts: Sequence[str],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    node_needs: Sequence[NodeRanges] | None = None,
) -> ClusterPlan:
    """Split a checkpoint's stripes among the nodes and their ranks (see the module doc).

    Args:
        sizes: file sizes in consumption order (the same list on every rank).
        hosts: the host identity of each global rank (``hosts[r]`` for rank r).
        chunk_bytes: the stripe unit, at least 4096.
        node_needs: what each node loads (in node order, as `Topology` numbers them):
            byte ranges per file index, or None for the whole checkpoint; None: every
            node loads all of it.

    Returns:
        A `ClusterPlan`; with one node it is `engine.plan`'s balanced split, with no
        receivers.

    Example:
        >>> p = cluster_plan([16384], ["a", "b", "a", "b"], chunk_bytes=4096)
        >>> [(s.reader, s.receivers) for s in p.stripes]
        [(0, (1,)), (1, (0,)), (2, (3,)), (3, (2,))]
        >>> p = cluster_plan([16384], ["a", "b"], chunk_bytes=8192,
        ...                  node_needs=[{0: [(0, 10000)]}, {0: [(4096, 16384)]}])
        >>> [(s.offset, s.length, s.reader, s.nodes) for s in p.stripes]
        [(0, 4096, 0, (0,)), (4096, 4096, 0, None), (8192, 1808, 1, None), (10000, 6384, 1, (1,))]
    """
    check_chunk_bytes(chunk_bytes)
    topo = Topology.from_hosts(hosts)
    n_nodes = topo.num_nodes
    if node_needs is not None and len(node_needs) != n_nodes:
        raise InvalidOptionError(f"node_needs has {len(node_needs)} entries for {n_nodes} nodes")
    extents = plan([(str(i), int(s)) for i, s in enumerate(sizes)], 0, 1, chunk_bytes=chunk_bytes)
    everyone = tuple(range(n_nodes))
    segments = None
    if node_needs is not None and any(n is not None for n in node_needs):
        regions = [None if n is None else {str(f): r for f, r in n.items()} for n in node_needs]
        segments = [
            needed_segments(str(i), int(size), regions, n_nodes) for i, size in enumerate(sizes)
        ]
    stripes: list[Stripe] = []
    for ext in extents:
        unit = ext.position // chunk_bytes
        file = int(ext.path)
        end = ext.offset + ext.length
        pieces = (
            [(ext.offset, end, everyone)]
            if segments is None
            else _clip(segments[file], ext.offset, end)
        )
        for lo, hi, who in pieces:
            node, turn = who[unit % len(who)], unit // len(who)
            reader = topo.nodes[node][turn % topo.local_world(node)]
            receivers = tuple(topo.nodes[m][turn % topo.local_world(m)] for m in who if m != node)
            position = ext.position + (lo - ext.offset)
            stripes.append(
                Stripe(len(stripes), file, lo, hi - lo, position, unit, reader, receivers,
                       None if who == everyone else who)
            )  # fmt: skip
    starts, pos = [], 0
    for s in sizes:
        starts.append(pos)
        pos += int(s)
    return ClusterPlan(
        topo,
        tuple(int(s) for s in sizes),
        chunk_bytes,
        tuple(stripes),
        tuple(starts),
        tuple(s.position for s in stripes),
    )
