"""A simulated multi-node load on one machine: node-local mode against cluster mode.

Each simulated node is one mount of the checkpoint's directory by the simulated network
filesystem (`bench.netfs`: separate page caches, exact bytes-served counters), its own
host identity (``CKPT_PREFETCH_HOST_ID``) and its own replica directory. All ranks of all
nodes join one gloo group over loopback. For each mode, the page caches are evicted and
the counters reset, fresh rank processes load the whole checkpoint (copying and
checksumming every tensor, `bench.worker.Consumer`), and the storage bytes served to all
nodes together are read from the counters.

The storage's bandwidth: every node's mount draws from one `bench.netfs.SharedBandwidth`
at the profile's rate, so the nodes share one limit as they would share one storage (a
node that idles leaves the whole rate to the others); the counters stay per node.

Run it::

    python -m bench.cluster_sim --size 2GiB --nodes 2 --ranks 2 --profile slow-nfs \\
        --out docs/results/cluster.json

One rank by hand (what the driver starts)::

    python -m bench.cluster_sim worker --rank 0 --world 4 --port 29500 --host node0 \\
        --mode cluster --out r0.json DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.launchers import child_env
from bench.parallel import SPLITS
from engine.procstat import process_cpu_s, process_state

__all__ = [
    "NodeRun",
    "SimResult",
    "main",
    "reference_tensors",
    "run_mode",
    "same_bytes",
    "simulate",
]

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
MODES = ("node", "cluster")
#: Modes of an EP or PP job (``--split``), each rank loading only its tensors:
#: ``vllm`` vLLM's own iterator without prefetch (its expert filter skips other ranks'
#: experts before reading them; a PP stage's model drops the other stages' tensors after),
#: ``vllm-prefetch`` the same with vLLM's prefetch (whole files, by global rank),
#: ``ours-whole`` our prefetch of the whole checkpoint, the filter applied to what it
#: yields (the plug-in before `tensors=`), ``ours`` our loader with ``tensors=``. MODES run
#: with a split too: ``cluster`` then passes ``tensors=`` to the cluster scope.
SPLIT_MODES = ("vllm", "vllm-prefetch", "ours-whole", "ours")
_HOST_ENV = "CKPT_PREFETCH_HOST_ID"


# --------------------------------------------------------------------------------------
# One rank


def _worker(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="cluster_sim worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=MODES + SPLIT_MODES, required=True)
    p.add_argument("--split", choices=SPLITS, default=None, help="an EP or PP job")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the --split job")
    p.add_argument("--out", required=True)
    p.add_argument("--chunk-mb", type=int, default=16)
    p.add_argument("--window-mb", type=int, default=0, help="0: automatic, -1: none")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--replica-dir", default=None)
    p.add_argument("--die-after-mb", type=int, default=0, help="SIGKILL self after this")
    p.add_argument("--stop-after-mb", type=int, default=0, help="SIGSTOP self after this")
    p.add_argument(
        "--die-at-replica-mb", type=int, default=0,
        help="SIGKILL self once the node's replica has allocated this much (cluster mode; a "
        "posted receive counts whole): mid-exchange whatever the loader's pace",
    )  # fmt: skip
    p.add_argument(
        "--stop-at-replica-mb", type=int, default=0,
        help="SIGSTOP self once the node's replica has allocated this much (cluster mode)",
    )  # fmt: skip
    p.add_argument(
        "--verify", default=None, metavar="DIR",
        help="compare every tensor with load_file on DIR (the originals, not the mount)",
    )  # fmt: skip
    p.add_argument("--cgroup", default=None, help="join this memory cgroup before loading")
    p.add_argument("checkpoint")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from bench.consumer import Consumer
    from loader_adapter import safetensors_weights_iterator

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world
    )
    consumer = Consumer(torch.empty(0, dtype=torch.uint8))
    reference = reference_tensors(a.verify) if a.verify else None
    mismatches: list[str] = []
    if a.cgroup:  # after the imports: only what the load brings in is charged
        from bench.cgroup import join

        join(a.cgroup)
    keep, own = _share(a.checkpoint, a.split, a.nodes, a.world, a.rank) if a.split else (None, None)
    if reference is not None and keep is not None:
        reference = {n: t for n, t in reference.items() if keep(n)}
    options: dict[str, Any] = {"chunk_bytes": a.chunk_mb << 20}
    if a.window_mb:
        options["window_bytes"] = None if a.window_mb < 0 else a.window_mb << 20
    dist.barrier()
    t0 = time.monotonic()
    cpu0 = time.process_time()
    replica_peak = 0
    last_tensor = 0.0
    report: Any = None
    if a.mode == "cluster":  # through the loader's public entry, as a server calls it
        it: Any = safetensors_weights_iterator(
            a.checkpoint,
            prefetch=True,
            scope="cluster",
            tensors=keep,
            replica_dir=a.replica_dir,
            exchange_timeout_s=a.timeout,
            setup_timeout_s=max(a.timeout, 120.0),
            **options,
        )
    elif a.mode in SPLIT_MODES:
        it = _split_iterator(a.mode, a.checkpoint, keep, own)
    else:
        it = safetensors_weights_iterator(a.checkpoint, prefetch=True, tensors=keep, **options)
    with it:
        if a.die_at_replica_mb or a.stop_at_replica_mb:
            kill = bool(a.die_at_replica_mb)
            mb = a.die_at_replica_mb or a.stop_at_replica_mb
            _fault_at_replica(it, mb << 20, signal.SIGKILL if kill else signal.SIGSTOP)
        for name, tensor in it:
            if keep is not None and not keep(name):
                continue  # read by a loader that filters after reading (vLLM's PP)
            consumer(name, tensor)
            last_tensor = time.monotonic() - t0
            if reference is not None and not same_bytes(reference.pop(name, None), tensor):
                mismatches.append(name)
            del tensor
            replica_peak = max(replica_peak, getattr(it, "replica_bytes", 0))
            if a.die_after_mb and consumer.nbytes >= a.die_after_mb << 20:
                os.kill(os.getpid(), signal.SIGKILL)
            if a.stop_after_mb and consumer.nbytes >= a.stop_after_mb << 20:
                a.stop_after_mb = 0
                os.kill(os.getpid(), signal.SIGSTOP)
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    report = getattr(it, "report", None)
    out = {
        "rank": a.rank,
        "host": os.environ.get(_HOST_ENV, ""),
        "mode": a.mode,
        "elapsed_s": elapsed,
        "last_tensor_s": last_tensor,
        "cpu_s": cpu,
        "tensors": consumer.tensors,
        "bytes": consumer.nbytes,
        "checksum": consumer.checksum,
        "replica_peak_bytes": replica_peak,
        "mismatches": mismatches + sorted(reference or ()),  # differing, then never yielded
        "verified": reference is not None,
        "report": report.to_dict() if report is not None else None,
    }
    Path(a.out).write_text(json.dumps(out))
    # No barrier or destroy: a peer that died must not hold this rank back.
    os._exit(0)


def _fault_at_replica(it: Any, nbytes: int, sig: signal.Signals) -> None:
    """Send `sig` to this process once the node's replica has allocated `nbytes` (a
    posted receive allocates its whole stripe), from a thread: the fault lands in the
    middle of the exchange, however far behind the loader is (a loader that parses and
    compares tensors on a busy machine may consume its first megabytes only after the
    whole exchange ended)."""

    def watch() -> None:
        while it.replica_bytes < nbytes:
            time.sleep(0.002)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="fault-at-replica", daemon=True).start()


def _share(
    checkpoint: str, split: str, nodes: int, world: int, rank: int
) -> tuple[Any, set[int] | None]:
    """What `rank` loads in a `split` job: a predicate on tensor names, and its experts
    (None: all) for vLLM's own filter. The headers are read once, here."""
    from bench.parallel import Split, model_shape
    from loader_adapter import expand_checkpoint_files
    from loader_adapter.header import read_header

    names = [t.name for f in expand_checkpoint_files(checkpoint) for t in read_header(f).tensors]
    layers, experts = model_shape(names)
    job = Split(split, nodes, world // nodes)
    return job.keeps(rank=rank, layers=layers, experts=experts), job.expert_ids(rank, experts)


class _Loaded(contextlib.AbstractContextManager[Any]):
    """A plain generator of (name, tensor) as a context manager, with no report."""

    report = None

    def __init__(self, pairs: Any) -> None:
        self._pairs = pairs

    def __iter__(self) -> Any:
        return iter(self._pairs)

    def __exit__(self, *exc: object) -> None:
        self._pairs.close()


def _split_iterator(mode: str, checkpoint: str, keep: Any, own: set[int] | None) -> Any:
    """The weights iterator of one of SPLIT_MODES: `keep` is what the rank loads, `own`
    its experts (`_share`)."""
    from loader_adapter import expand_checkpoint_files, safetensors_weights_iterator

    if mode == "ours":
        return safetensors_weights_iterator(checkpoint, prefetch=True, tensors=keep)
    if mode == "ours-whole":
        return safetensors_weights_iterator(checkpoint, prefetch=True)
    from vllm.model_executor.model_loader.weight_utils import (
        safetensors_weights_iterator as vllm_iterator,
    )

    files = expand_checkpoint_files(checkpoint)
    strategy = "prefetch" if mode == "vllm-prefetch" else None  # None: off on FUSE mounts
    return _Loaded(vllm_iterator(files, False, strategy, own))


def reference_tensors(checkpoint: str) -> dict[str, Any]:
    """Every tensor of the checkpoint as ``safetensors.torch.load_file`` gives it."""
    from safetensors.torch import load_file

    from loader_adapter import expand_checkpoint_files

    out: dict[str, Any] = {}
    for path in expand_checkpoint_files(checkpoint):
        out.update(load_file(path))
    return out


def same_bytes(expected: Any, got: Any) -> bool:
    """Same dtype, shape and bytes (bytes, not values: random bits hold NaNs)."""
    import torch

    if expected is None or expected.dtype != got.dtype or expected.shape != got.shape:
        return False
    return torch.equal(
        expected.reshape(-1).view(torch.uint8), got.contiguous().reshape(-1).view(torch.uint8)
    )


# --------------------------------------------------------------------------------------
# The driver


@dataclass
class NodeRun:
    """One simulated node's figures for one mode."""

    host: str
    bytes_served: int
    requests: int
    server_cpu_s: float = 0.0
    needed_bytes: int = 0  # what its ranks load (a --split job), else 0


@dataclass
class SimResult:
    """One mode of a simulated cluster load."""

    mode: str
    checkpoint_bytes: int
    nodes: list[NodeRun]
    ranks: list[dict[str, Any]]
    wall_s: float
    failed_ranks: list[int] = field(default_factory=list)
    granted_bytes: int = 0  # what the shared bandwidth limit granted to all nodes
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the machine's, at the end
    split: str | None = None  # "ep" or "pp": each rank loads part of the checkpoint
    repeat: int = 0

    @property
    def node_served_over_needed(self) -> float:
        """The largest node's storage bytes over the bytes its ranks load (a split job)."""
        return max((n.bytes_served / n.needed_bytes for n in self.nodes if n.needed_bytes),
                   default=float("nan"))  # fmt: skip

    @property
    def bytes_served(self) -> int:
        """Storage bytes served to all nodes together."""
        return sum(n.bytes_served for n in self.nodes)

    @property
    def served_ratio(self) -> float:
        """Storage bytes served over the checkpoint's size."""
        return self.bytes_served / self.checkpoint_bytes

    @property
    def load_s(self) -> float:
        """Time to the last tensor of the slowest rank that finished."""
        return max((r["elapsed_s"] for r in self.ranks), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bytes_served=self.bytes_served, served_ratio=self.served_ratio, load_s=self.load_s)
        if self.split:
            d["node_served_over_needed"] = self.node_served_over_needed
        return d


def _stopped(pid: int) -> bool:
    return process_state(pid) in ("T", "t")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(
    mode: str,
    node_dirs: Sequence[str | os.PathLike[str]],
    ranks_per_node: int,
    *,
    workdir: str | os.PathLike[str],
    chunk_mb: int = 16,
    window_mb: int = 0,
    timeout_s: float = 60.0,
    replica_dirs: Sequence[str | os.PathLike[str]] | None = None,
    worker_args: dict[int, list[str]] | None = None,
    limit_s: float = 600.0,
    split: str | None = None,
) -> tuple[list[dict[str, Any]], list[int], float]:
    """Start every rank of every node in one gloo group and wait for them.

    Global rank ``r`` is local rank ``r // nodes`` of node ``r % nodes`` (ranks of a node
    are not contiguous, as with some launchers). Extra arguments for some ranks (a fault
    to inject) come in `worker_args`. Ranks stopped with SIGSTOP are continued once every
    other rank has ended; ranks still running after `limit_s` are killed. With `split`
    ("ep" or "pp") each rank loads only its part (`bench.parallel.Split`).

    Returns:
        (the results of the ranks that finished, the ranks that did not, wall seconds).
    """
    nodes = len(node_dirs)
    world = nodes * ranks_per_node
    port = _free_port()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    t0 = time.monotonic()
    for rank in range(world):
        node = rank % nodes
        env = {k: v for k, v in child_env().items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update({_HOST_ENV: f"node{node}", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
        cmd = [
            sys.executable, "-m", "bench.cluster_sim", "worker",
            "--rank", str(rank), "--world", str(world), "--port", str(port), "--mode", mode,
            "--out", str(work / f"{mode}-r{rank}.json"), "--chunk-mb", str(chunk_mb),
            "--window-mb", str(window_mb), "--timeout", str(timeout_s),
        ]  # fmt: skip
        if replica_dirs is not None:
            cmd += ["--replica-dir", str(replica_dirs[node])]
        if split:
            cmd += ["--split", split, "--nodes", str(nodes)]
        cmd += (worker_args or {}).get(rank, [])
        cmd.append(str(node_dirs[node]))
        log_file = open(work / f"{mode}-r{rank}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log_file)
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=_ROOT)
        )
    try:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            running = [p for p in procs if p.poll() is None]
            if not running:
                break
            if all(_stopped(p.pid) for p in running):
                # A stalled rank (SIGSTOP) comes back once every other rank is done.
                for p in running:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGCONT)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)  # a stopped rank cannot die otherwise
                    p.kill()
                p.wait()
        for f in logs:
            f.close()
    wall = time.monotonic() - t0
    results, failed = [], []
    for rank in range(world):
        out = work / f"{mode}-r{rank}.json"
        if out.exists():
            results.append(json.loads(out.read_text()))
        else:
            failed.append(rank)
    return results, failed, wall


def simulate(
    checkpoint_dir: str | os.PathLike[str],
    *,
    nodes: int = 2,
    ranks_per_node: int = 2,
    profile: str = "slow-nfs",
    modes: Sequence[str] | None = None,
    chunk_mb: int = 16,
    window_mb: int = 0,
    timeout_s: float = 60.0,
    workdir: str | os.PathLike[str] | None = None,
    split: str | None = None,
    repeats: int = 1,
) -> list[SimResult]:
    """Load `checkpoint_dir` on `nodes` simulated nodes in each mode; see the module doc.

    Args:
        checkpoint_dir: the checkpoint's directory (its safetensors files).
        nodes: simulated nodes, each its own mount of `checkpoint_dir`.
        ranks_per_node: rank processes per node.
        profile: the simulated storage (`bench.netfs.PROFILES`); the nodes share its
            bandwidth.
        modes: what to run (default MODES, or SPLIT_MODES with `split`).
        chunk_mb: our reads' size.
        window_mb: our window (0: automatic, -1: none).
        timeout_s: the cluster exchange's timeout.
        workdir: where the ranks write their results and logs (default: a new temporary
            directory).
        split: ``"ep"`` or ``"pp"``: each rank loads its part (`bench.parallel.Split`).
        repeats: rounds; each runs every mode once, in order.

    Returns:
        One result per round and mode, rounds in order.
    """
    from bench.netfs import PROFILES, SharedBandwidth, mounted
    from bench.parallel import Split, node_needed_bytes

    modes = tuple(modes or (SPLIT_MODES if split else MODES))
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    needed = [0] * nodes
    if split:
        needed = node_needed_bytes(Split(split, nodes, ranks_per_node), [str(f) for f in files])
    results: list[SimResult] = []
    with contextlib.ExitStack() as stack:
        # a directory of our own making goes with the run (the results are in memory)
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cluster-sim-"))
        work = Path(workdir)
        storage = stack.enter_context(SharedBandwidth(PROFILES[profile].bandwidth_bps))
        mounts = [
            stack.enter_context(mounted(checkpoint_dir, profile=profile, shared_bandwidth=storage))
            for _ in range(nodes)
        ]
        for repeat in range(repeats):
            for mode in modes:
                for fs in mounts:
                    fs.evict()
                    fs.reset_counters()
                granted0 = storage.snapshot().granted_bytes
                cpu0 = [process_cpu_s(fs.pid) for fs in mounts]
                ranks, failed, wall = run_mode(
                    mode, [fs.path for fs in mounts], ranks_per_node, workdir=work / f"{repeat}",
                    chunk_mb=chunk_mb, window_mb=window_mb, timeout_s=timeout_s, split=split,
                )  # fmt: skip
                counters = [fs.counters() for fs in mounts]
                cpu = [process_cpu_s(fs.pid) - c0 for fs, c0 in zip(mounts, cpu0, strict=True)]
                node_runs = [
                    NodeRun(f"node{i}", c.bytes_served, c.requests, cpu[i], needed[i])
                    for i, c in enumerate(counters)
                ]
                granted = storage.snapshot().granted_bytes - granted0
                result = SimResult(
                    mode, total, node_runs, ranks, wall, failed, granted, os.getloadavg(),
                    split, repeat,
                )  # fmt: skip
                results.append(result)
                log.info("%s: %.2fx served, %.1f s", mode, result.served_ratio, result.load_s)
    return results


def interconnect_estimate(result: SimResult, *, link_gbps: float, storage_bps: float) -> float:
    """Seconds a real cluster would need, from the measured bytes and stated link speeds.

    Each node reads its share of the storage bytes at ``storage_bps / nodes`` (the storage
    is shared) and receives what it did not read over its own link of `link_gbps` Gbit/s;
    the two overlap, so the load takes the longer of them. Node-local mode has no exchange.
    """
    n = len(result.nodes)
    read_s = result.bytes_served / storage_bps  # the shared storage serves all bytes
    received = sum((r.get("report") or {}).get("received_bytes", 0) for r in result.ranks)
    per_node_received = received / n
    link_s = per_node_received / (link_gbps * 1e9 / 8)
    return max(read_s, link_s)


def _table(results: Sequence[SimResult]) -> str:
    lines = [
        f"{'mode':8} {'served':>10} {'x ckpt':>7} {'load s':>7} {'checksums':>9} {'failed':>6} "
        f"{'load avg (1, 5, 15 min)':>24}",
    ]
    everywhere = {x["checksum"] for r in results for x in r.ranks}
    for r in results:
        sums = {x["checksum"] for x in r.ranks}
        lines.append(
            f"{r.mode:8} {r.bytes_served / 2**20:9.0f}M {r.served_ratio:7.4f} {r.load_s:7.1f} "
            f"{'same' if len(sums) == 1 else 'DIFFER':>9} {len(r.failed_ranks):6d} "
            f"{' '.join(f'{x:.1f}' for x in r.load_avg):>24}"
        )
    lines.append(
        f"checksums of all ranks in all modes: {'identical' if len(everywhere) == 1 else 'DIFFER'}"
    )
    return "\n".join(lines)


def rank_checksums_agree(results: Sequence[SimResult]) -> bool:
    """Whether each rank loaded the same tensors (checksum and count) in every mode and
    round, and no rank failed: in a split job ranks differ from each other, not from
    themselves."""
    by_rank: dict[int, set[str]] = {}
    for r in results:
        if r.failed_ranks:
            return False
        for x in r.ranks:
            by_rank.setdefault(x["rank"], set()).add(x["checksum"])
    return bool(by_rank) and all(len(sums) == 1 for sums in by_rank.values())


def _split_table(results: Sequence[SimResult]) -> str:
    """Each round and mode of a split job, then the medians per mode."""
    import statistics

    head = f"{'round':>5} {'mode':14} {'served':>9} {'x ckpt':>7} {'node/needed':>11} {'load s':>7}"
    lines = [head]
    for r in results:
        lines.append(
            f"{r.repeat:5d} {r.mode:14} {r.bytes_served / 2**20:8.0f}M {r.served_ratio:7.3f} "
            f"{r.node_served_over_needed:11.3f} {r.load_s:7.1f}"
        )
    lines.append("median:")
    for mode in dict.fromkeys(r.mode for r in results):
        mine = [r for r in results if r.mode == mode]
        lines.append(
            f"{'':5} {mode:14} {statistics.median(r.bytes_served for r in mine) / 2**20:8.0f}M "
            f"{statistics.median(r.served_ratio for r in mine):7.3f} "
            f"{statistics.median(r.node_served_over_needed for r in mine):11.3f} "
            f"{statistics.median(r.load_s for r in mine):7.1f}"
        )
    agree = rank_checksums_agree(results)
    lines.append(
        f"each rank's tensors in all modes and rounds: {'identical' if agree else 'DIFFER'}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``worker`` for one rank, else the whole simulation."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster_sim", description=__doc__.split("\n")[0]
    )
    p.add_argument("--size", default="2GiB", help="checkpoint size (default 2GiB)")
    p.add_argument("--checkpoint", default=None, help="an existing checkpoint directory")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2, help="ranks per node")
    p.add_argument("--profile", default="slow-nfs")
    p.add_argument("--chunk-mb", type=int, default=16)
    p.add_argument("--window-mb", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--link-gbps", type=float, default=200.0, help="interconnect for the estimate")
    p.add_argument(
        "--split", choices=SPLITS, default=None,
        help="an expert- (ep) or pipeline-parallel (pp) job: each rank loads its part, in the "
        f"modes {', '.join(SPLIT_MODES)} (default: whole loads, node-local against cluster mode)",
    )  # fmt: skip
    p.add_argument("--shape", default=None, help="checkpoint shape (default: many-small with "
                   "--split, a mixture of experts; else uniform)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="rounds of every mode (default 1)")
    p.add_argument("--modes", default=None, help="comma-separated modes to run (default: all "
                   "of MODES, or of SPLIT_MODES with --split)")  # fmt: skip
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from bench.checkpoint import make_checkpoint
    from bench.netfs import PROFILES
    from bench.results import host_metadata
    from engine.units import parse_size

    tmp = None
    ckpt = a.checkpoint
    if ckpt is None:
        tmp = tempfile.mkdtemp(prefix="cluster-ckpt-", dir=os.environ.get("TMPDIR", "/var/tmp"))
        shape = a.shape or ("many-small" if a.split else "uniform")
        ckpt = str(make_checkpoint(tmp, size_bytes=parse_size(a.size), shape=shape).directory)
    try:
        t0 = time.monotonic()
        load_start = os.getloadavg()
        results = simulate(
            ckpt, nodes=a.nodes, ranks_per_node=a.ranks, profile=a.profile,
            chunk_mb=a.chunk_mb, window_mb=a.window_mb, timeout_s=a.timeout, split=a.split,
            repeats=a.repeats, modes=a.modes.split(",") if a.modes else None,
        )  # fmt: skip
        storage_bps = PROFILES[a.profile].bandwidth_bps or 1e12
        print(_split_table(results) if a.split else _table(results))
        estimates = {
            r.mode: interconnect_estimate(r, link_gbps=a.link_gbps, storage_bps=storage_bps)
            for r in results
            if not a.split  # no exchange: nothing to estimate
        }
        for mode, est in estimates.items():
            print(f"estimate {mode}: {est:.1f} s with {a.link_gbps:g} Gbit/s links")
        if a.out:
            doc = {
                "version": 1,
                "command": " ".join(["python -m bench.cluster_sim", *argv]),
                "host": host_metadata(),
                "split": a.split,
                "profile": a.profile,
                "storage_bps": storage_bps,
                "bandwidth_shared_by_nodes": True,
                "load_avg_start": load_start,
                "link_gbps": a.link_gbps,
                "duration_s": time.monotonic() - t0,
                "results": [r.to_dict() for r in results],
                "estimates_s": estimates,
            }
            Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
