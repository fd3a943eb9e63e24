"""Cluster mode end to end: 4 gloo processes posing as 2 nodes load one checkpoint; every
rank gets exactly the tensors of ``safetensors.torch.load_file``, each stripe is read by
one rank of the job, and the replicas are gone at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.checkpoint import make_checkpoint
from bench.cluster_sim import run_mode

MiB = 1 << 20
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint):
    return synthetic_checkpoint(size_bytes=40 * MiB, shards=3)


def _shm_dir(tmp_path: Path, name: str) -> Path:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    d = base / f"ckpt-cluster-test-{os.getpid()}-{name}"
    d.mkdir()
    return d


def _verify(checkpoint) -> list[str]:
    return ["--verify", str(checkpoint.directory)]


def _check_all_equal(ranks, checkpoint):
    for r in ranks:
        assert r["verified"] and r["mismatches"] == [], r["mismatches"][:5]
        assert r["tensors"] == checkpoint.tensor_count
    assert len({r["checksum"] for r in ranks}) == 1


def test_two_nodes_load_exact_tensors_reading_each_byte_once(checkpoint, tmp_path):
    reps = [tmp_path / "rep0", tmp_path / "rep1"]  # a local disk as replica directory
    for d in reps:
        d.mkdir()
    ranks, failed, _ = run_mode(
        "cluster", [checkpoint.directory] * 2, 2, workdir=tmp_path / "w", chunk_mb=2,
        timeout_s=20, replica_dirs=reps, worker_args={r: _verify(checkpoint) for r in range(4)},
    )  # fmt: skip
    assert failed == []
    _check_all_equal(ranks, checkpoint)
    reports = [r["report"] for r in ranks]
    assert all(rep["scope"] == "cluster" and rep["failures"] == [] for rep in reports)
    assert [(rep["node"], rep["local_rank"]) for rep in reports] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    total = checkpoint.total_bytes
    assert sum(rep["read_bytes"] for rep in reports) == total  # once for the whole job
    assert sum(rep["fallback_bytes"] for rep in reports) == 0
    for node in (0, 1):
        mine = [rep for rep in reports if rep["node"] == node]
        read = sum(rep["read_bytes"] for rep in mine)
        assert sum(rep["received_bytes"] for rep in mine) == total - read
        assert abs(read - total / 2) <= 2 * MiB  # half each, to a stripe
    assert sum(rep["sent_bytes"] for rep in reports) == total
    assert [list(d.iterdir()) for d in reps] == [[], []]  # replicas removed
    assert all(rep["tuning"].startswith("adaptive: ") for rep in reports), reports[0]["tuning"]


def test_a_window_bounds_the_replica_in_shared_memory(checkpoint, tmp_path):
    reps = [_shm_dir(tmp_path, "a"), _shm_dir(tmp_path, "b")]
    try:
        ranks, failed, _ = run_mode(
            "cluster", [checkpoint.directory] * 2, 2, workdir=tmp_path / "w", chunk_mb=1,
            window_mb=4, timeout_s=20, replica_dirs=reps,
            worker_args={r: _verify(checkpoint) for r in range(4)},
        )  # fmt: skip
        assert failed == []
        _check_all_equal(ranks, checkpoint)
        for r in ranks:
            rep = r["report"]
            window = rep["window_bytes"]
            assert window >= 4 * MiB  # at least the largest tensor plus two stripes
            # window ahead + trail behind (max(window/4, 2 stripes x 2 ranks)) + stripes in
            # flight (reads 4, transfers 4) + a page per file edge
            bound = window + max(window // 4, 4 * MiB) + 8 * MiB + 3 * 8192
            assert r["replica_peak_bytes"] <= bound, (r["replica_peak_bytes"], bound)
            assert rep["peak_replica_bytes"] <= bound
            assert rep["peak_replica_bytes"] < checkpoint.total_bytes
        assert sum(r["report"]["punched_bytes"] for r in ranks) > checkpoint.total_bytes
        assert [list(d.iterdir()) for d in reps] == [[], []]
    finally:
        for d in reps:
            for p in d.glob("*/*"):
                p.unlink()
            for p in d.glob("*"):
                p.rmdir() if p.is_dir() else p.unlink()
            d.rmdir()


def test_one_node_loads_in_node_local_mode(checkpoint, tmp_path):
    """All ranks on one host: the collective says so and every rank falls back alike."""
    ranks, failed, _ = run_mode(
        "cluster", [checkpoint.directory], 2, workdir=tmp_path / "w", timeout_s=20,
        worker_args={r: _verify(checkpoint) for r in range(2)},
    )  # fmt: skip
    assert failed == []
    _check_all_equal(ranks, checkpoint)
    assert [r["report"]["scope"] for r in ranks] == ["node", "node"]
    assert all(r["report"]["reason"] == "all ranks are on one node" for r in ranks)
    assert [(r["report"]["local_rank"], r["report"]["local_world"]) for r in ranks] == [
        (0, 2),
        (1, 2),
    ]


def test_invalid_arguments_raise_before_any_collective(checkpoint):
    from loader_adapter.cluster import cluster_weights_iterator

    with pytest.raises(ValueError, match="prefetch=True"):
        cluster_weights_iterator(checkpoint.directory, prefetch=False)
    with pytest.raises(TypeError, match="unknown prefetch option"):
        cluster_weights_iterator(checkpoint.directory, windw_bytes=1)
    with pytest.raises(ValueError, match="chunk_bytes"):
        cluster_weights_iterator(checkpoint.directory, chunk_bytes=100)


def test_without_torch_distributed_it_loads_in_node_local_mode(checkpoint):
    import torch
    from safetensors.torch import load_file

    from loader_adapter.cluster import cluster_weights_iterator

    expected = {}
    for path in checkpoint.files:
        expected.update(load_file(path))
    with cluster_weights_iterator(checkpoint.directory) as it:
        got = {name: tensor.clone() for name, tensor in it}
    assert it.scope == "node" and it.report.scope == "node"
    assert it.report.reason == "torch.distributed is not initialized"
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8))


def test_the_loader_takes_the_cluster_scope(checkpoint):
    from loader_adapter import safetensors_weights_iterator

    with safetensors_weights_iterator(checkpoint.directory, prefetch=True, scope="cluster") as it:
        n = sum(1 for _ in it)
    assert n == checkpoint.tensor_count
    assert it.report.reason == "torch.distributed is not initialized"  # a cluster report
    with pytest.raises(ValueError, match="scope must be"):
        safetensors_weights_iterator(checkpoint.directory, scope="rack")
    with pytest.raises(ValueError, match="no rank or world"):
        safetensors_weights_iterator(checkpoint.directory, prefetch=True, scope="cluster", rank=0)


def test_the_scope_flags_reach_the_loader():
    import argparse

    from loader_adapter import add_prefetch_args, prefetch_options_from_args

    p = add_prefetch_args(argparse.ArgumentParser())
    args = p.parse_args(
        ["--prefetch-mode", "on", "--prefetch-scope", "cluster", "--prefetch-replica-dir", "/x"]
    )
    assert prefetch_options_from_args(args) == {
        "prefetch": True,
        "scope": "cluster",
        "replica_dir": "/x",
    }


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_storage_reads_in_flight_adapt_at_run_time(tmp_path):
    # A store whose single stream is slow (bench's many-streams profile): each node's
    # controller measures its read rate and changes its reads in flight (whether it tries
    # more or sheds depends on this machine's spare cores; that it decides does not). The
    # aggregate is capped so that the load outlasts the controller's first intervals (up
    # to `engine.pace.MAX_INTERVAL_S` each) on a machine of any speed: with the profile's
    # own 1 GB/s the stripes read deep enough to finish 1 GiB in 2.5 s, before a decision.

    from bench.netfs import mounted

    big = make_checkpoint(tmp_path / "ck", size_bytes=1024 * MiB, shards=4)
    with mounted(big.directory, profile="many-streams", bandwidth_bps=128e6) as fs:
        fs.evict()
        ranks, failed, _ = run_mode(
            "cluster", [fs.path] * 2, 1, workdir=tmp_path / "w", chunk_mb=16, timeout_s=60,
        )  # fmt: skip
    assert failed == []
    reports = [r["report"] for r in ranks]
    assert all(rep["scope"] == "cluster" for rep in reports)
    assert sum(rep["read_bytes"] for rep in reports) == big.total_bytes
    for rep in reports:  # "adaptive: N streams x R MiB reads after C changes (why)"
        changes = int(rep["tuning"].split(" after ")[1].split()[0])
        assert rep["tuning"].startswith("adaptive: ") and changes >= 1, rep["tuning"]
