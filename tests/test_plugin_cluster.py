"""The plug-ins' cluster scope: ``{"scope": "cluster"}`` in a plug-in's options loads
through the cluster exchange (each byte read from storage once for the job), and the
report line gives the exact bytes each rank read, received and sent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from serving_support import ROOT, free_port

MiB = 1 << 20
pytestmark = pytest.mark.timeout(240)

_LINE = re.compile(
    r"cluster scope, rank (\d+) of 2, node (\d+) of 2, local rank 0 of 1: read=(\d+) "
    r"received=(\d+) sent=(\d+) fallback=(\d+) bytes"
)


def _run(
    checkpoint: Path, options: dict, tmp_path: Path, hosts: list[str], split: str = ""
) -> list[dict]:
    port = free_port()
    procs = []
    for rank, host in enumerate(hosts):
        env = {
            **os.environ,
            "CKPT_PREFETCH_HOST_ID": host,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable, str(ROOT / "tests" / "_plugin_cluster_worker.py"), str(rank),
            str(len(hosts)), str(port), str(checkpoint), json.dumps(options),
            str(tmp_path / f"r{rank}.json"), *([split] if split else []),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(len(hosts))]


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint):
    return synthetic_checkpoint(size_bytes=12 * MiB, shards=2)


def test_two_nodes_read_each_byte_once_through_the_plugin_path(checkpoint, tmp_path):
    replicas = tmp_path / "replicas"  # a local disk; each "node" names its replica by host
    replicas.mkdir()
    options = {
        "scope": "cluster", "chunk_bytes": "1MiB", "exchange_timeout_s": 30,
        "replica_dir": str(replicas),
    }  # fmt: skip
    results = _run(checkpoint.directory, options, tmp_path, ["node0", "node1"])
    lines = []
    for res in results:
        assert res["mismatches"] == [] and res["left"] == []
        assert res["tensors"] == checkpoint.tensor_count
        found = [m for line in res["lines"] if (m := _LINE.search(line))]
        assert len(found) == 1, res["lines"]
        lines.append([int(x) for x in found[0].groups()])
    assert sorted(line[1] for line in lines) == [0, 1]  # two nodes
    assert sum(line[2] for line in lines) == checkpoint.total_bytes  # read once for the job
    assert all(line[5] == 0 for line in lines)  # nothing read again in place of a peer
    assert lines[0][3] == lines[1][4] and lines[1][3] == lines[0][4]  # received = sent
    assert list(replicas.iterdir()) == []  # removed at the end


def test_one_node_falls_back_to_node_local_and_says_so(checkpoint, tmp_path):
    results = _run(checkpoint.directory, {"scope": "cluster"}, tmp_path, ["same", "same"])
    for res in results:
        assert res["mismatches"] == [] and res["tensors"] == checkpoint.tensor_count
        assert any("cluster scope fell back to node-local mode" in line for line in res["lines"]), (
            res["lines"]
        )


def test_a_rank_that_skips_tensors_brings_only_its_share_into_its_node(checkpoint, tmp_path):
    # The plug-ins' `skip` (vLLM's expert filter) reaches the cluster scope as `tensors=`:
    # each node receives only the stripes its rank loads (before, every stripe everywhere).
    options = {"scope": "cluster", "chunk_bytes": "1MiB", "exchange_timeout_s": 30,
               "replica_dir": str(tmp_path)}  # fmt: skip
    results = _run(checkpoint.directory, options, tmp_path, ["node0", "node1"], "halves")
    lines = []
    for res in results:
        assert res["mismatches"] == [] and res["left"] == []  # its share, every tensor of it
        assert 0 < res["tensors"] < checkpoint.tensor_count
        found = [m for line in res["lines"] if (m := _LINE.search(line))]
        assert len(found) == 1, res["lines"]
        lines.append([int(x) for x in found[0].groups()])
    for _, _, read, received, _, fallback in lines:
        assert fallback == 0
        assert read + received < 0.8 * checkpoint.total_bytes  # not the whole checkpoint
    assert sum(line[2] for line in lines) <= 1.05 * checkpoint.total_bytes
