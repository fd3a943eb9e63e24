"""What one rank's cluster-mode load did: `ClusterReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loader_adapter.options import Scope

__all__ = ["ClusterReport"]


@dataclass(frozen=True)
class ClusterReport:
    """What one rank's cluster-mode load did.

    Attributes:
        scope: ``"cluster"``, or ``"node"`` when the job fell back to node-local mode.
        reason: why it fell back (empty in cluster mode).
        rank: global rank; world: global world size.
        node: this rank's node; nodes: number of nodes.
        local_rank: rank within the node; local_world: ranks on the node.
        chunk_bytes: the stripe unit.
        window_bytes: the window (None: the replica holds the whole checkpoint).
        total_bytes: bytes in the checkpoint.
        planned_read_bytes: bytes of the stripes this rank was to read from storage.
        read_bytes: bytes this rank read from storage for its stripes.
        fallback_bytes: bytes this rank read from storage in place of stripes that did
            not arrive (a failed or stalled peer).
        sent_bytes: bytes sent to other nodes; received_bytes: bytes received.
        punched_bytes: bytes this rank freed from the replica behind the slowest local rank.
        peak_replica_bytes: the most memory (or disk) the node's replica held, as sampled
            by this rank.
        failed_peers: global ranks this rank gave up on.
        failures: one line per problem, for the log.
        elapsed_s: seconds from the start to the end of the load.
        timeline_s: seconds from the start to the last read, send, receive, fallback read
            and punch of this rank (where a load spends its time).
        replica_dir: the replica's directory (removed at the end).
        tuning: how many storage reads this rank kept in flight: fixed, or where run-time
            adaptation (`engine.adapt`, on this rank's read rate) ended and why.
    """

    scope: str
    reason: str = ""
    rank: int = 0
    world: int = 1
    node: int = 0
    nodes: int = 1
    local_rank: int = 0
    local_world: int = 1
    chunk_bytes: int = 0
    window_bytes: int | None = None
    total_bytes: int = 0
    planned_read_bytes: int = 0
    read_bytes: int = 0
    fallback_bytes: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    punched_bytes: int = 0
    peak_replica_bytes: int = 0
    failed_peers: tuple[int, ...] = ()
    failures: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    timeline_s: dict[str, float] = field(default_factory=dict)
    replica_dir: str = ""
    tuning: str = ""

    @property
    def ok(self) -> bool:
        """Cluster mode ran with no failure."""
        return self.scope == Scope.CLUSTER and not self.failures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)
