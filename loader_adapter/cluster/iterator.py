"""The cluster-mode iterator: the tensors of a checkpoint from the node's replica.

`cluster_weights_iterator` joins the job (`loader_adapter.cluster.collective`), opens the
node's replica, starts this rank's `Exchange` and yields each tensor once every stripe
under it is there; or, when the job decided against cluster mode, loads node-local.
The package's doc (`loader_adapter.cluster`) has an example.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import struct
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from engine import ResolvedFile, auto_window, memory_budget, resolve_files, start_prefetch
from engine.plan import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from engine.tuning import NODE_STREAMS, max_streams
from loader_adapter.cluster.collective import join
from loader_adapter.cluster.exchange import DEFAULT_INFLIGHT, Exchange
from loader_adapter.cluster.join import NOTHING_SHARED, ONE_NODE, Joined
from loader_adapter.cluster.replica import Replica
from loader_adapter.cluster.report import ClusterReport
from loader_adapter.cluster.transport import GlooTransport
from loader_adapter.files import CheckpointFiles, expand_checkpoint_files
from loader_adapter.header import read_header
from loader_adapter.iterator import (
    TensorFilter,
    WeightsIterator,
    needed_ranges,
    node_weights_iterator,
    tensor_predicate,
)

__all__ = [
    "DEFAULT_REPLICA_DIR",
    "REPLICA_DIR_ENV",
    "ClusterReport",
    "ClusterWeightsIterator",
    "cluster_weights_iterator",
]

log = logging.getLogger(__name__)

#: Where replicas live unless `replica_dir` or ``$CKPT_PREFETCH_REPLICA_DIR`` says otherwise.
DEFAULT_REPLICA_DIR = "/dev/shm"
#: Environment variable naming the replica directory (a local disk, say).
REPLICA_DIR_ENV = "CKPT_PREFETCH_REPLICA_DIR"
#: Keyword options of `engine.start_prefetch`, accepted here as by the node-local loader.
_ENGINE_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(start_prefetch).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


# --------------------------------------------------------------------------------------
# The iterator


class ClusterWeightsIterator(WeightsIterator):
    """The iterator `cluster_weights_iterator` returns: ``(name, tensor)`` pairs.

    A `loader_adapter.WeightsIterator`: `close()` stops it early (and the exchange), it is
    a context manager; but `report` is a `ClusterReport` once the iteration has ended (in
    node-local mode the node-local prefetch's `engine.PrefetchReport` is `node_report`).
    """

    def __init__(
        self,
        gen: Iterator[tuple[str, torch.Tensor]],
        *,
        session: Exchange | None = None,
        fallback: Any = None,
        reason: str = "",
        place: dict[str, int] | None = None,
    ) -> None:
        super().__init__(gen, None)
        self._session = session
        self._fallback = fallback
        self._reason = reason
        self._place = place or {}
        self._report: ClusterReport | None = None
        self._t0 = time.monotonic()

    def close(self) -> None:
        """Stop the iteration and the exchange; the replica is left (removed by the last
        local rank). Idempotent."""
        super().close()
        if self._fallback is not None:
            self._fallback.close()
        if self._session is not None:
            self._session.cancel()
        if self._report is None:
            self._finish()

    @property
    def prefetching(self) -> bool:
        """Always: cluster mode, or its node-local fallback with prefetch."""
        return True

    @property
    def scope(self) -> str:
        """``"cluster"``, or ``"node"`` when the job fell back to node-local mode."""
        return "cluster" if self._session is not None else "node"

    @property
    def report(self) -> ClusterReport | None:  # type: ignore[override]
        """The load's `ClusterReport`, once the iteration has ended (None before)."""
        return self._report

    @property
    def replica_bytes(self) -> int:
        """Memory (or disk) the node's replica holds now; 0 in node-local mode."""
        if self._session is None or self._session.replica.closed:
            return 0
        return self._session.replica.allocated_bytes()

    @property
    def node_report(self) -> Any:
        """In node-local mode, the node-local prefetch's report (None otherwise)."""
        return self._fallback.report if self._fallback is not None else None

    def _finish(self) -> None:
        if self._session is not None:
            self._report = self._session.report()
        else:
            self._report = ClusterReport(
                scope="node", reason=self._reason,
                elapsed_s=time.monotonic() - self._t0, **self._place,
            )  # fmt: skip


def _replica_tensors(
    files: Sequence[ResolvedFile],
    session: Exchange,
    done: Callable[[], None],
    wanted: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (wanted) tensor from the replica, each once its bytes are there."""
    plan, replica = session.plan, session.replica
    try:
        for i, f in enumerate(files):
            start = plan.file_starts[i]
            if f.size >= 8:
                session.wait_range(start, start + 8)
                (n,) = struct.unpack("<Q", bytes(replica.view(i, 0, 8)))
                session.wait_range(start, start + min(f.size, 8 + n))
            else:
                session.wait_range(start, start + f.size)
            path = str(replica.paths[i])
            with safe_open(path, framework="pt") as st:
                for t in read_header(path).tensors:  # by offset, as the stripes arrive
                    if wanted is not None and not wanted(t.name):
                        continue  # no rank of this node loads it: it is not brought here
                    session.wait_range(start + t.start, start + t.end)
                    tensor = st.get_tensor(t.name)
                    yield t.name, tensor
                    del tensor
                    session.advance(start + t.end)
            session.advance(start + f.size)
        session.finish()
        done()
    finally:
        session.cancel()


def _node_tensors(it: Any, done: Callable[[], None]) -> Iterator[tuple[str, torch.Tensor]]:
    yield from it
    done()


def _local_place(hosts: Sequence[str]) -> tuple[int, int] | None:
    """(local rank, local world) of this rank from the gathered host list."""
    if not hosts or not dist.is_initialized():
        return None
    me = dist.get_rank()
    same = [r for r, h in enumerate(hosts) if h == hosts[me]]
    return same.index(me), len(same)


def cluster_weights_iterator(
    files: CheckpointFiles,
    *,
    prefetch: bool | str = True,
    replica_dir: str | os.PathLike[str] | None = None,
    exchange_timeout_s: float = 60.0,
    setup_timeout_s: float = 300.0,
    read_threads: int | None = None,
    tensors: TensorFilter | None = None,
    **prefetch_options: Any,
) -> ClusterWeightsIterator:
    """Iterate over a checkpoint's tensors, each byte read from storage once for the job.

    Every rank of the (initialised) default process group must call it with the same
    arguments: it runs one collective. The tensors and their order are those of
    `loader_adapter.safetensors_weights_iterator`. In cluster mode they are backed by the
    node's replica: with a window, copy each tensor before asking for the next one (the
    replica is freed behind the slowest local rank, and a freed range reads as zeros).
    When cluster mode cannot run (one node, no gloo, a rank without room for the replica,
    different files, ...) every rank loads in node-local mode instead and `report.reason`
    says why.

    Args:
        files: ``.safetensors`` paths, a checkpoint directory, or an index JSON.
        prefetch: True, or ``"auto"`` (node-local mode unless every rank's files are on a
            network or FUSE filesystem). False is not cluster mode: use the plain loader.
        replica_dir: where each node keeps its replica (default ``$CKPT_PREFETCH_REPLICA_DIR``
            or ``/dev/shm``); a local disk works too.
        exchange_timeout_s: how long one transfer may wait for its peer before the peer is
            given up (its stripes are then read from storage); longer than the lag between
            nodes you accept.
        setup_timeout_s: how long the one collective waits for every rank to arrive.
        read_threads: storage reads in flight per rank (default: the ``concurrency``
            option if it is a number, else 8 per node shared among its ranks).
        tensors: the tensors this rank loads (a predicate on names, or a collection;
            None: all). Each node brings in only what its ranks load, each needed byte
            still read from storage once for the job and sent only to the nodes that need
            it; other tensors are not yielded.
        **prefetch_options: `engine.start_prefetch` options. ``chunk_bytes`` (the stripe
            unit; rank 0's value is used, default 16 MiB), ``window_bytes`` (``"auto"``:
            none when the checkpoint fits in memory, else half the budget) and ``order``
            apply in cluster mode; all apply in node-local mode.

    Returns:
        A `ClusterWeightsIterator` (its `report` is a `ClusterReport` once it ended).

    Raises:
        OSError: a checkpoint file is missing or unreadable.
        ValueError: an invalid option.
    """
    if not (prefetch is True or prefetch == "auto"):
        raise ValueError(f"cluster mode needs prefetch=True or 'auto', got {prefetch!r}")
    unknown = set(prefetch_options) - _ENGINE_OPTIONS
    if unknown:  # before the collective: every rank raises alike
        raise TypeError(
            f"unknown prefetch option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(_ENGINE_OPTIONS))}"
        )
    options = dict(prefetch_options)
    order = options.get("order", "sorted")
    resolved, failures = resolve_files(expand_checkpoint_files(files), order=order)
    if failures:
        raise OSError(failures[0].errno or 0, failures[0].message, failures[0].path)
    if not resolved:
        raise ValueError("no checkpoint files given")
    chunk = options.get("chunk_bytes", "auto")
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk == "auto" else chunk
    check_chunk_bytes(chunk_bytes)
    wanted = tensor_predicate(tensors)
    needs, header_ends = _needs(resolved, wanted) if wanted is not None else (None, [])
    total = sum(f.size for f in resolved)
    window = options.get("window_bytes", "auto")
    if window == "auto":
        window, why = auto_window(total, budget=memory_budget(), min_bytes=4 * chunk_bytes)
        log.info("cluster mode: %s", why)
    base = os.fspath(replica_dir or os.environ.get(REPLICA_DIR_ENV) or DEFAULT_REPLICA_DIR)
    need = total if window is None else min(total, 2 * int(window) + 4 * chunk_bytes)
    joined = join(
        resolved,
        chunk_bytes=chunk_bytes,
        replica_base=base,
        need_bytes=need,
        windowed=window is not None,
        timeout_s=setup_timeout_s,
        prefetch=prefetch,
        needs=needs,
        header_ends=header_ends,
    )
    if joined.plan is None:
        return _node_local(files, prefetch, joined, options, tensors)

    session = _start_exchange(
        joined, resolved, base, window=window, read_threads=read_threads,
        concurrency=options.get("concurrency"), exchange_timeout_s=exchange_timeout_s,
    )  # fmt: skip
    if isinstance(session, str):  # only this rank: its peers time out on it
        log.warning("cluster mode: %s; this rank loads in node-local mode", session)
        return _node_local(files, prefetch, Joined(session, joined.hosts), options, tensors)
    holder: list[ClusterWeightsIterator] = []
    gen = _replica_tensors(resolved, session, lambda: holder[0]._finish(), wanted)
    weakref.finalize(gen, session.cancel)  # a generator never started runs no `finally`
    it = ClusterWeightsIterator(gen, session=session)
    holder.append(it)
    return it


def _needs(
    resolved: Sequence[ResolvedFile], wanted: Callable[[str], bool]
) -> tuple[tuple[tuple[int, int, int], ...], list[int]]:
    """What this rank loads, ``(file index, start, end)``, and where each file's tensor
    data starts (for the collective's nothing-shared decision)."""
    by_path, headers = needed_ranges(resolved, wanted)
    header_ends = [headers[f.path].data_start if f.path in headers else 0 for f in resolved]
    index = {f.path: i for i, f in enumerate(resolved)}
    needs = tuple(
        (index[p], lo, hi) for p, ranges in by_path.items() for lo, hi in ranges if hi > lo
    )
    # a file whose header could not be read is needed whole (the loader then raises)
    needs += tuple((i, 0, f.size) for i, f in enumerate(resolved) if f.path not in by_path)
    return needs, header_ends


def _start_exchange(
    joined: Joined,
    resolved: Sequence[ResolvedFile],
    base: str,
    *,
    window: int | None,
    read_threads: int | None,
    concurrency: Any,
    exchange_timeout_s: float,
) -> Exchange | str:
    """Open this node's replica and start this rank's exchange; or why not (a string)."""
    plan = joined.plan
    assert plan is not None
    me = dist.get_rank()
    topo = plan.topology
    node = topo.node_of[me]
    local_world = topo.local_world(node)
    if window is not None:
        # A tensor larger than the window would wait for stripes the window never lets in.
        window = max(int(window), joined.max_tensor_bytes + 2 * plan.chunk_bytes)
    host_key = hashlib.sha256(topo.hosts[me].encode()).hexdigest()[:8]
    name = f"ckpt-prefetch-{os.geteuid()}-{joined.nonce}-{host_key}"
    try:
        replica = Replica.open(
            base, name, [os.path.basename(f.path) for f in resolved], [f.size for f in resolved],
            len(plan.stripes), topo.local_rank_of[me], local_world,
        )  # fmt: skip
    except OSError as exc:
        return f"cannot make the replica in {base}: {exc}"
    if read_threads is None and isinstance(concurrency, int) and not isinstance(concurrency, bool):
        read_threads = concurrency  # reads in flight per rank, as in node-local mode
    threads = read_threads or max(1, NODE_STREAMS // local_world)
    session = Exchange(
        plan, me, GlooTransport(joined.group), replica, [f.path for f in resolved],
        window_bytes=window, timeout_s=exchange_timeout_s,
        read_threads=threads, inflight=DEFAULT_INFLIGHT,
        # adapted at run time, as in node-local mode, unless the reads in flight were given
        max_read_threads=None if read_threads else max(threads, max_streams(local_world)),
    )  # fmt: skip
    log.info(
        "cluster mode: node %d of %d, local rank %d of %d, %d stripes of %d MiB, window %s, "
        "replica %s",
        node, topo.num_nodes, topo.local_rank_of[me], local_world, len(plan.stripes),
        plan.chunk_bytes >> 20, "none" if window is None else f"{window >> 20} MiB",
        replica.directory,
    )  # fmt: skip
    return session


def _node_local(
    files: CheckpointFiles,
    prefetch: Any,
    joined: Joined,
    options: dict[str, Any],
    tensors: TensorFilter | None = None,
) -> ClusterWeightsIterator:
    """Node-local mode, local ranks from the gathered hosts (no further collective)."""
    place = _local_place(joined.hosts)
    level = logging.INFO if joined.reason in (ONE_NODE, NOTHING_SHARED) else logging.WARNING
    log.log(level, "cluster mode off: %s; loading in node-local mode", joined.reason)
    if place is None:
        env = (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE"))
        place = (int(env[0]), int(env[1])) if all(env) else (0, 1)  # type: ignore[arg-type]
    it = node_weights_iterator(
        files, prefetch=prefetch, rank=place[0], world=place[1], tensors=tensors, **options
    )
    holder: list[ClusterWeightsIterator] = []
    gen = _node_tensors(it, lambda: holder[0]._finish())
    out = ClusterWeightsIterator(
        gen, fallback=it, reason=joined.reason,
        place={"local_rank": place[0], "local_world": place[1]},
    )  # fmt: skip
    holder.append(out)
    return out
