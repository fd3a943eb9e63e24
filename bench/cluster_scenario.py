"""Simulated nodes as a scenario of the suite: one round of `bench.cluster_sim` per step.

A matrix with ``nodes > 1`` (the ``cluster`` and ``cluster-ep`` scenarios) is measured by
`bench.cluster_sim.simulate`: the nodes are FUSE mounts of one checkpoint that share one
storage bandwidth limit, its ranks one gloo job. Each round runs every mode once; each
mode's run becomes a sample of the suite's results (one schema, one table and plot with
the other scenarios), with the per-node storage bytes in its ``detail``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.checkpoint import Checkpoint
from bench.cluster_sim import SimResult, rank_checksums_agree, simulate
from bench.errors import BenchError, ChecksumMismatch
from bench.models import Sample
from bench.protocol import RankReport

__all__ = ["ClusterRound", "describe", "measure_round", "to_sample"]


@dataclasses.dataclass(frozen=True)
class ClusterRound:
    """One round of every mode across simulated nodes.

    Attributes:
        group: where (its matrix has ``nodes > 1``; its filesystem is the shared profile).
        ranks_per_node: rank processes per node.
        repeat: the round's number (0-based).
        label: the progress line.
    """

    group: Any
    ranks_per_node: int
    repeat: int
    label: str


def _rank(x: dict[str, Any]) -> RankReport:
    """A simulated rank's result as the suite's rank report (no memory peaks measured)."""
    return RankReport(
        rank=x["rank"], t_release=0.0, t_done=x["elapsed_s"], wall_s=x["elapsed_s"],
        cpu_s=x["cpu_s"], peak_rss_bytes=0, peak_anon_bytes=0, bytes_consumed=x["bytes"],
        tensors=x["tensors"], checksum=x["checksum"], io_read_bytes=None, prefetch=x["report"],
    )  # fmt: skip


def to_sample(result: SimResult) -> Sample:
    """One mode's run as a suite sample: time to the slowest rank's last tensor, the
    nodes' storage bytes summed, each rank's report; the nodes in ``detail``."""
    ranks = [_rank(x) for x in sorted(result.ranks, key=lambda x: x["rank"])]
    detail = {
        "mode": result.mode,
        "split": result.split,
        "nodes": [dataclasses.asdict(n) for n in result.nodes],
        "granted_bytes": result.granted_bytes,
        "failed_ranks": result.failed_ranks,
        "load_avg": list(result.load_avg),
    }
    return Sample.of(
        wall_s=result.load_s, ranks=ranks, served=result.bytes_served,
        total_bytes=result.checkpoint_bytes, resident=0.0, detail=detail,
    )  # fmt: skip


def measure_round(step: ClusterRound, ckpt: Checkpoint, *, workdir: Any) -> list[SimResult]:
    """Run every mode of `step`'s matrix once across its simulated nodes.

    Raises:
        BenchError: a rank did not finish.
        ChecksumMismatch: a rank loaded other bytes in one mode than in another.
    """
    m = step.group.matrix
    results = simulate(
        ckpt.directory, nodes=m.nodes, ranks_per_node=step.ranks_per_node, profile=step.group.fs,
        modes=m.configs, split=m.split, workdir=workdir,
    )  # fmt: skip
    failed = {r.mode: r.failed_ranks for r in results if r.failed_ranks}
    if failed:
        raise BenchError(f"{step.label}: ranks did not finish: {failed}")
    if not rank_checksums_agree(results):
        raise ChecksumMismatch(f"{step.label}: a rank loaded different bytes in two modes")
    if m.split is None:
        for r in results:
            if any(x["tensors"] != ckpt.tensor_count for x in r.ranks):
                raise ChecksumMismatch(f"{step.label}: {r.mode} did not load every tensor")
    return results


def describe(fs: str, nodes: int) -> dict[str, Any]:
    """The results document's entry for the nodes' shared filesystem."""
    from bench.netfs import PROFILES

    profile = dataclasses.asdict(PROFILES[fs])
    return {
        "kind": "netfs",
        "label": f"{nodes} simulated nodes, each a FUSE mount of {fs}, one shared storage limit",
        "profile": profile,
        "requested": fs,
    }
