"""The cluster simulation (bench/cluster_sim.py): its nodes are mounts of one storage with
one bandwidth limit, and each node's bytes are counted apart."""

from __future__ import annotations

import tempfile

import pytest

from bench.checkpoint import make_checkpoint
from bench.cluster_sim import simulate

MiB = 1 << 20
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]


def test_the_simulated_nodes_draw_from_one_storage_limit(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "ck", size_bytes=12 * MiB, shards=2)
    total = checkpoint.total_bytes
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    node, cluster = simulate(
        checkpoint.directory, nodes=2, ranks_per_node=1, profile="slow-nfs", chunk_mb=1,
        timeout_s=20,
    )  # fmt: skip
    # the work directory it made for itself went with the run
    assert not list(scratch.glob("cluster-sim-*"))
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


def test_simulated_nodes_are_a_scenario_of_the_suite(tmp_path):
    """``--scenario cluster`` through the suite's one runner: one results schema (validated,
    with the host and commit), one table, the nodes' storage bytes in each sample."""
    from bench.report import rows
    from bench.runner import run_suite
    from bench.suites import Matrix, Suite

    m = Matrix(
        "cluster", ("slow-nfs",), (1,), ("uniform",), ("node", "cluster"), 24 * MiB,
        hot=False, fio=False, nodes=2,
    )  # fmt: skip
    doc = run_suite(Suite(name="t", matrices=(m,), repeats=1, warmup=0, workdir=tmp_path))
    by = {r["config"]: r for r in doc["results"]}
    assert set(by) == {"node", "cluster"}
    assert {(r["scenario"], r["kind"], r["ranks"]) for r in by.values()} == {("cluster", "load", 2)}
    node, cluster = by["node"]["samples"][0], by["cluster"]["samples"][0]
    assert node["bytes_served_ratio"] >= 1.98  # each node read all of it
    assert cluster["bytes_served_ratio"] <= 1.1  # once for both nodes
    assert node["checksum"] is not None and node["checksum"] == cluster["checksum"]
    assert [n["host"] for n in cluster["detail"]["nodes"]] == ["node0", "node1"]
    assert doc["filesystems"]["slow-nfsx2"]["kind"] == "netfs"
    assert "git_commit" in doc["host"]
    assert {r.config for r in rows(doc)} == {"node", "cluster"}


def test_a_cluster_matrix_takes_only_the_simulation_s_modes_and_profiles():
    from bench.suites import Matrix, Suite, validate_suite

    def suite(**kw):
        base = {"configs": ("node",), "fs": ("slow-nfs",)} | kw
        m = Matrix("cluster", base["fs"], (2,), ("uniform",), base["configs"], MiB, nodes=2)
        return Suite(name="t", matrices=(m,))

    validate_suite(suite())
    with pytest.raises(ValueError, match="unknown mode 'ours'"):
        validate_suite(suite(configs=("ours",)))
    with pytest.raises(ValueError, match="netfs profile"):
        validate_suite(suite(fs=("local",)))
