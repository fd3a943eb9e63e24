"""The cluster simulation (bench/cluster_sim.py): its nodes are mounts of one storage with
one bandwidth limit, and each node's bytes are counted apart."""

from __future__ import annotations

import pytest

from bench.checkpoint import make_checkpoint
from bench.cluster_sim import simulate

MiB = 1 << 20
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]


def test_the_simulated_nodes_draw_from_one_storage_limit(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ck", size_bytes=12 * MiB, shards=2)
    total = checkpoint.total_bytes
    node, cluster = simulate(
        checkpoint.directory, nodes=2, ranks_per_node=1, profile="slow-nfs", chunk_mb=1,
        timeout_s=20, workdir=tmp_path / "w",
    )  # fmt: skip
    assert (node.mode, cluster.mode) == ("node", "cluster")
    for result in (node, cluster):
        assert result.failed_ranks == []
        assert len({r["checksum"] for r in node.ranks + cluster.ranks}) == 1
        # Every byte either node was served was granted by the one shared limit.
        assert result.granted_bytes == result.bytes_served
        assert len(result.load_avg) == 3
    assert [n.host for n in node.nodes] == ["node0", "node1"]
    assert all(n.bytes_served >= 0.99 * total for n in node.nodes)  # each node read it all
    assert cluster.served_ratio <= 1.1  # once for both nodes
