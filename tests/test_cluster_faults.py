"""Cluster mode under faults: a rank of one node killed or stalled mid-exchange.

The fault lands when the node's replica has allocated 4 of the 32 MiB (a posted receive
counts whole; `bench.cluster_sim`'s ``--die-at-replica-mb``), so the rank still owes most
of its stripes: a fault after the loader consumed a few megabytes came after the whole
exchange when the loader fell behind it, and the other ranks then had nothing to give up.

Two simulated nodes (two mounts of a throttled FUSE filesystem: separate page caches, one
shared bandwidth limit) with two ranks each. The other ranks must go on loading exactly
the right tensors, reading from storage what the lost rank owed, and report it; a stalled
rank that comes back finishes too. No wall-clock assertion: "bounded" means every
surviving rank ends by itself before the driver's deadline (`LIMIT_S`), which is several
exchange timeouts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from fuse_support import require_fuse

from bench.cluster_sim import run_mode
from bench.netfs import SharedBandwidth, mounted

MiB = 1 << 20
TIMEOUT_S = 2.0
LIMIT_S = 90.0
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint):
    return synthetic_checkpoint(size_bytes=32 * MiB, shards=3)


def _run(checkpoint, tmp_path: Path, fault: list[str], on_mounts=None):
    require_fuse()
    reps = [tmp_path / "rep0", tmp_path / "rep1"]
    verify = ["--verify", str(checkpoint.directory)]
    for d in reps:
        d.mkdir()
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(SharedBandwidth(32e6))
        mounts = [
            stack.enter_context(
                mounted(checkpoint.directory, profile="local-fuse", shared_bandwidth=storage)
            )
            for _ in range(2)
        ]
        if on_mounts is not None:
            on_mounts(mounts)
        ranks, failed, _ = run_mode(
            "cluster", [m.path for m in mounts], 2, workdir=tmp_path / "w", chunk_mb=2,
            timeout_s=TIMEOUT_S, replica_dirs=reps, limit_s=LIMIT_S,
            worker_args={r: [*verify, *(fault if r == 3 else [])] for r in range(4)},
        )  # fmt: skip
        served = sum(m.counters().bytes_served for m in mounts)
    return ranks, failed, served, reps


def _check_exact(ranks, checkpoint):
    for r in ranks:
        assert r["mismatches"] == [], r["mismatches"][:5]
        assert r["tensors"] == checkpoint.tensor_count
    assert len({r["checksum"] for r in ranks}) == 1


def test_a_killed_rank_leaves_the_others_loading_from_storage(checkpoint, tmp_path):
    ranks, failed, served, reps = _run(checkpoint, tmp_path, ["--die-at-replica-mb", "4"])
    assert failed == [3]  # killed by itself; the others ended on their own
    _check_exact(ranks, checkpoint)
    by_rank = {r["rank"]: r["report"] for r in ranks}
    # Its partner on the other node gave up on it; its node-mate read what it owed.
    assert 3 in by_rank[2]["failed_peers"]
    assert any("gave up on rank 3" in f for f in by_rank[2]["failures"])
    assert by_rank[1]["fallback_bytes"] > 0
    assert sum(rep["fallback_bytes"] for rep in by_rank.values()) > 0
    assert served >= checkpoint.total_bytes  # the fallback reads came from storage
    assert [list(d.iterdir()) for d in reps] == [[], []]  # the survivor removed node 1's


def test_a_stalled_rank_is_given_up_and_finishes_when_it_comes_back(checkpoint, tmp_path):
    ranks, failed, _, reps = _run(checkpoint, tmp_path, ["--stop-at-replica-mb", "4"])
    assert failed == []  # the stalled rank, continued after the others ended, finished too
    _check_exact(ranks, checkpoint)
    by_rank = {r["rank"]: r["report"] for r in ranks}
    assert 3 in by_rank[2]["failed_peers"]
    assert by_rank[1]["fallback_bytes"] > 0  # its node-mate did not wait for it
    assert by_rank[3]["failures"]  # the stalled rank knows its exchange broke
    assert [list(d.iterdir()) for d in reps] == [[], []]


def test_a_read_error_on_one_node_fails_only_that_nodes_load(checkpoint, tmp_path):
    # Node 1's storage client fails reads of the first file's [4, 8) MiB (stripes of 2 MiB
    # alternate between the nodes, so node 1 reads some of them): node 1's ranks get the
    # error, as a load without prefetch would; node 0 gives its partner up after the
    # exchange timeout and reads what it owed from its own, healthy client.
    first = sorted(Path(checkpoint.directory).glob("*.safetensors"))[0].name
    ranks, failed, served, reps = _run(
        checkpoint, tmp_path, [], on_mounts=lambda m: m[1].inject_eio(first, 4 * MiB, 4 * MiB)
    )
    assert failed == [1, 3]  # node 1: the load raised
    logs = "".join((tmp_path / "w" / f"cluster-r{r}.log").read_text() for r in failed)
    assert "Input/output error" in logs
    _check_exact(ranks, checkpoint)  # node 0: every tensor exact
    by_rank = {r["rank"]: r["report"] for r in ranks}
    failures = [f for rep in by_rank.values() for f in rep["failures"]]
    assert any("gave up on rank" in f for f in failures), failures
    assert sum(rep["fallback_bytes"] for rep in by_rank.values()) > 0
    assert served >= checkpoint.total_bytes  # node 0's own reads, its fallback reads included
    assert [list(d.iterdir()) for d in reps] == [[], []]
