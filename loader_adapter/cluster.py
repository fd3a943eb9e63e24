"""Cluster mode: each byte of the checkpoint read from shared storage once for the whole job.

The stripes of the checkpoint are split among the nodes and among each node's ranks
(`engine.cluster_plan`). Each rank reads its stripes from storage into its node's replica
(`engine.replica`), sends each one to one rank of every other node through
``torch.distributed`` point-to-point messages (gloo), and receives its share of the other
nodes' stripes into the replica. The loader reads the replica's files with ``safe_open``
and yields a tensor only once every stripe under it is ready, so the tensors are exactly
those of ``safetensors.torch.load_file`` on the original files. ``docs/cluster.md`` has the
design: where bytes live, the ready map, the exchange schedule, faults and limits.

Collective and symmetric: every rank of the default process group calls
`cluster_weights_iterator` with the same files and options. One collective decides (an
``all_gather_object`` on a gloo group with a timeout): every rank takes the same branch,
cluster mode or node-local mode (`loader_adapter.safetensors_weights_iterator` with
prefetch, local ranks taken from the same gathered host list, no further collective).
After that only point-to-point messages run, each with a timeout: a peer that dies or
stalls is given up, the stripes it owed are read from storage by the node that needed
them, and the report says so.

Example:
    >>> dist.init_process_group("gloo")  # doctest: +SKIP
    >>> with cluster_weights_iterator("/nfs/ckpt") as it:  # doctest: +SKIP
    ...     for name, tensor in it:
    ...         params[name].copy_(tensor)
    ...     print(it.report)
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import inspect
import json
import logging
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from engine import ResolvedFile, auto_window, memory_budget, resolve_files, start_prefetch
from engine.cluster_plan import (
    ONE_NODE,
    ClusterPlan,
    MemberInfo,
    Op,
    OpKind,
    Stripe,
    agree,
    cluster_plan,
)
from engine.memory import trail_bytes
from engine.plan import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from engine.replica import READY_STATES, Replica, StripeState

try:  # the engine's restructuring moves it
    from engine.mounts import read_ahead_bytes  # type: ignore[import-not-found]
except ImportError:
    from engine.backends import read_ahead_bytes
from loader_adapter.discovery import host_identity
from loader_adapter.files import CheckpointFiles, expand_checkpoint_files
from loader_adapter.fsdetect import decide_auto
from loader_adapter.iterator import WeightsIterator, safetensors_weights_iterator, tensor_order

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
#: Exchange operations in flight per rank (each is a stripe: no extra buffer is used).
DEFAULT_INFLIGHT = 4
#: Reads in flight per node aimed at (as `engine.tuning.NODE_STREAMS`), split among ranks.
_NODE_STREAMS = 8
#: The end of each stripe read without read-ahead: this many read-ahead windows, at least
#: `_MIN_TAIL_BYTES` (see `_Session._read_stripe`).
_TAIL_WINDOWS = 2
_MIN_TAIL_BYTES = 256 << 10
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.02
#: Keyword options of `engine.start_prefetch`, accepted here as by the node-local loader.
_ENGINE_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(start_prefetch).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)
#: Transfers that timed out: gloo may still touch their memory, so it is never freed.
_ABANDONED: list[Any] = []


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

    @property
    def ok(self) -> bool:
        """Cluster mode ran with no failure."""
        return self.scope == "cluster" and not self.failures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Joining: the one collective


@dataclass(frozen=True)
class _Joined:
    """The outcome of the collective: cluster mode with its plan, or node-local mode."""

    reason: str
    hosts: tuple[str, ...] = ()
    plan: ClusterPlan | None = None
    nonce: str = ""
    max_tensor_bytes: int = 0
    group: Any = None


def _max_tensor_bytes(paths: Sequence[str]) -> int:
    """The largest tensor of the checkpoint, from the headers."""
    largest = 0
    for path in paths:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                largest = max(largest, end - start)
    return largest


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _member_error(
    files: Sequence[ResolvedFile], replica_base: str, need_bytes: int, prefetch: Any
) -> str | None:
    """Why this rank cannot take part in cluster mode, or None."""
    if prefetch == "auto":
        decision = decide_auto([f.path for f in files], sum(f.size for f in files))
        if not decision.enabled:
            return f"prefetch='auto' says no here ({decision.reason})"
    if not os.path.isdir(replica_base) or not os.access(replica_base, os.W_OK | os.X_OK):
        return f"replica directory {replica_base} is not a writable directory"
    try:
        free = _free_bytes(replica_base)
    except OSError as exc:
        return f"cannot stat {replica_base}: {exc}"
    if free < need_bytes:
        return f"{replica_base} has {free >> 20} MiB free, the replica needs {need_bytes >> 20} MiB"
    return None


def _join(
    files: Sequence[ResolvedFile],
    *,
    chunk_bytes: int,
    replica_base: str,
    need_bytes: int,
    windowed: bool,
    timeout_s: float,
    prefetch: Any,
) -> _Joined:
    """Every rank of the default group: gather each rank's view, decide the same way."""
    if not (dist.is_available() and dist.is_initialized()):
        return _Joined("torch.distributed is not initialized")
    world = dist.get_world_size()
    try:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # no gloo: nobody can make the group, so every rank is here
        return _Joined(f"cannot make a gloo group: {exc!r}")
    info = MemberInfo(
        host_identity(),
        tuple(os.path.basename(f.path) for f in files),
        tuple(f.size for f in files),
        _member_error(files, replica_base, need_bytes, prefetch),
    )
    extra: dict[str, Any] = {}
    if dist.get_rank() == 0:
        extra["nonce"] = secrets.token_hex(6)
        extra["chunk_bytes"] = chunk_bytes
        if windowed and info.error is None:
            try:
                extra["max_tensor_bytes"] = _max_tensor_bytes([f.path for f in files])
            except (OSError, ValueError, KeyError, struct.error) as exc:
                info = MemberInfo(info.host, info.names, info.sizes, f"bad header: {exc!r}")
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, (info, extra), group=group)
    except Exception as exc:  # timed out: a rank never came, or died
        return _Joined(f"gathering the ranks' views failed: {exc!r}")
    infos = [g[0] for g in gathered]
    hosts = tuple(i.host for i in infos)
    reason = agree(infos)
    if reason is not None:
        return _Joined(reason, hosts)
    first = gathered[0][1]
    plan = cluster_plan([f.size for f in files], hosts, chunk_bytes=first["chunk_bytes"])
    return _Joined("", hosts, plan, first["nonce"], first.get("max_tensor_bytes", 0), group)


# --------------------------------------------------------------------------------------
# The session: reading, exchanging, repairing, freeing


class _Session:
    """One rank's part of a cluster-mode load (threads, counters, the replica)."""

    def __init__(
        self,
        plan: ClusterPlan,
        rank: int,
        group: Any,
        replica: Replica,
        sources: Sequence[str],
        *,
        window_bytes: int | None,
        timeout_s: float,
        read_threads: int,
        inflight: int,
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.group = group
        self.replica = replica
        self.sources = list(sources)
        self.window = window_bytes
        self.timeout_s = timeout_s
        topo = plan.topology
        self.node = topo.node_of[rank]
        self.local_rank = topo.local_rank_of[rank]
        self.trail = (
            trail_bytes(
                window_bytes, chunk_bytes=plan.chunk_bytes, world=topo.local_world(self.node)
            )
            if window_bytes is not None
            else 0
        )
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._cancel = threading.Event()
        self._src_fds: dict[tuple[int, bool], int] = {}
        self._tails: dict[int, int] = {}
        self._own = plan.reads(rank)
        self._next_read = 0
        self._pending_sends = {s.index: len(s.receivers) for s in self._own}
        self._read_failed: set[int] = set()
        self._failed_peers: set[int] = set()
        self._failures: list[str] = []
        self._counts = collections.Counter[str]()
        self._timeline: dict[str, float] = {}
        self._peak = 0
        self._punch_next = 0
        self._punched_to = [0] * len(plan.sizes)
        self._janitor_lock = threading.Lock()
        self._repair: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._abandoned = False
        self._last_progress = time.monotonic()
        self._unsent: set[int] = set()
        self._inflight = max(1, inflight)
        self._stopped = False
        n_threads = max(1, read_threads)
        for i in range(n_threads):
            self._threads.append(
                self._spawn(self._read_loop, f"ckpt-cluster-read-{i}", self._reads_lost)
            )
        self._outstanding: collections.deque[tuple[Op, Any, Any, bool]] = collections.deque()
        self._posting_done = False
        self._threads.append(
            self._spawn(self._complete_loop, "ckpt-cluster-complete", self._orphan_all_expected)
        )
        self._exchange = self._spawn(
            self._exchange_loop, "ckpt-cluster-exchange", self._orphan_all_expected
        )
        self._threads.append(self._exchange)

    def _spawn(
        self, fn: Callable[[], None], name: str, on_crash: Callable[[], None] | None = None
    ) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # every background failure lands in the report
                self._fail(f"{name} crashed: {exc!r}")
                if on_crash is not None:
                    on_crash()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------ bookkeeping
    def _fail(self, message: str) -> None:
        with self._lock:
            self._failures.append(message)
        log.warning("cluster mode: %s", message)

    def _count(self, key: str, n: int) -> None:
        with self._cond:
            self._counts[key] += n
            self._last_progress = time.monotonic()
            self._timeline[key] = self._last_progress - self._t0
            self._cond.notify_all()

    def _src_fd(self, file: int, *, tail: bool = False) -> int:
        key = (file, tail)
        with self._lock:
            fd = self._src_fds.get(key)
            if fd is None:
                fd = self._src_fds[key] = os.open(self.sources[file], os.O_RDONLY | os.O_CLOEXEC)
                if tail:  # read-ahead state is per open file: this one reads no further
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

    def _tail_bytes(self, file: int) -> int:
        size = self._tails.get(file)
        if size is None:
            window = read_ahead_bytes(os.fstat(self._src_fd(file)).st_dev)
            size = self._tails[file] = max(_TAIL_WINDOWS * window, _MIN_TAIL_BYTES)
        return size

    def _read_stripe(self, s: Stripe) -> int:
        """Read a stripe from storage into the replica; return the bytes read.

        The kernel's read-ahead runs past the end of a read into the next stripe, which
        another node reads: those bytes leave storage twice (1.3% of the checkpoint on the
        simulated NFS). Without read-ahead one stream waits for each request in turn (half
        the speed). So the stripe's last read-ahead windows are read first through a descriptor
        without read-ahead (``POSIX_FADV_RANDOM``), then the rest with read-ahead, which
        then ends in bytes already cached. The other order does not work: the tail read
        meets the pages the first read marked for read-ahead, and read-ahead marks act
        whatever the descriptor's advice (measured: the same 1.3%).
        """
        tail = min(s.length, self._tail_bytes(s.file))
        head = s.length - tail
        n = self.replica.fill_from(s.file, s.offset + head, tail, self._src_fd(s.file, tail=True))
        if head:
            n += self.replica.fill_from(s.file, s.offset, head, self._src_fd(s.file))
        _drop_cache(self._src_fd(s.file), s.offset, s.length)
        return n

    def _gate(self) -> float:
        """How far (exclusive) this node may bring stripes in: slowest consumer + window."""
        if self.window is None:
            return float("inf")
        low = self.replica.slowest(grace_s=self.timeout_s)
        return float("inf") if low is None else low + self.window

    def _wait_until(self, ready: Callable[[], bool]) -> bool:
        """Wait (polling: other processes change the map) until `ready()`; False if cancelled."""
        delay = _POLL_MIN_S
        while not ready():
            if self._cancel.is_set():
                return False
            with self._cond:
                self._cond.wait(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        return True

    # ------------------------------------------------------------------ reads
    def _read_loop(self) -> None:
        backlog_max = None if self.window is None else max(2, self.window // self.plan.chunk_bytes)
        while not self._cancel.is_set():
            with self._lock:
                if self._next_read >= len(self._own):
                    return
                s = self._own[self._next_read]
                self._next_read += 1

            def may_read(s: Any = s) -> bool:
                if s.position >= self._gate():
                    return False
                if backlog_max is None:
                    return True
                with self._lock:  # the earliest stripe may always go: the exchange needs it
                    return len(self._unsent) < backlog_max or s.index < min(self._unsent)

            if not self._wait_until(may_read):
                return
            if self.replica.ready(s.index):  # already filled by a fallback read
                self._sent_or_ready(s.index)
                continue
            try:
                n = self._read_stripe(s)
            except Exception as exc:  # the stripe is lost, the other stripes are not
                self._fail(f"reading {self.sources[s.file]} [{s.offset}, +{s.length}): {exc!r}")
                with self._cond:
                    self._read_failed.add(s.index)
                    self._cond.notify_all()
                continue
            self._count("read", n)
            self._sent_or_ready(s.index)
            self._sample_peak()

    def _reads_lost(self) -> None:
        """A reader crashed: nothing waits for the stripes no reader took (the loader and
        the receivers read them from storage themselves)."""
        with self._cond:
            self._read_failed.update(s.index for s in self._own[self._next_read :])
            self._next_read = len(self._own)
            self._cond.notify_all()

    def _sent_or_ready(self, stripe: int) -> None:
        """Mark an own stripe SENDING while sends are pending, READY when none are."""
        with self._lock:
            pending = self._pending_sends.get(stripe, 0)
            if pending:
                self._unsent.add(stripe)
        state = StripeState.SENDING if pending else StripeState.READY
        self.replica.set_state(stripe, state)
        with self._cond:
            self._cond.notify_all()

    # --------------------------------------------------------------- exchange
    def _exchange_loop(self) -> None:
        """Post this rank's transfers in the schedule's order, at most `inflight` at once.

        Posting waits for gates (the window, an own stripe's read); completions are waited
        for on another thread (`_complete_loop`), so that a transfer that is done is marked
        ready while posting waits: the loader may need it to move the window.
        """
        try:
            for op in self.plan.schedule(self.rank):
                if not self._wait_until(lambda: len(self._outstanding) < self._inflight):
                    break
                if op.peer in self._failed_peers:
                    self._skip(op)
                    continue
                try:
                    posted = self._post(op)
                except RuntimeError as exc:  # gloo: the pair is closed (the peer died)
                    self._peer_failed(op.peer, f"{op.kind.value} of stripe {op.stripe}: {exc}")
                    self._skip(op)
                    continue
                if posted is not None:
                    with self._cond:
                        self._outstanding.append((op, *posted))
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._posting_done = True
                self._cond.notify_all()

    def _complete_loop(self) -> None:
        """Wait for posted transfers in order and record them."""
        while True:
            with self._cond:
                while not self._outstanding and not self._posting_done:
                    if self._cancel.is_set():
                        return
                    self._cond.wait(0.1)
                if not self._outstanding:
                    return
                item = self._outstanding[0]
            if self._cancel.is_set():
                with self._cond:
                    self._abandoned = True
                    _ABANDONED.extend(self._outstanding)
                return
            self._complete(*item)
            with self._cond:
                self._outstanding.popleft()
                self._cond.notify_all()

    def _post(self, op: Op) -> tuple[Any, Any, bool] | None:
        """Start one transfer: (work, its tensor, whether it lands in the replica), or None."""
        s = self.plan.stripes[op.stripe]
        if op.kind is OpKind.SEND:
            ok = self._wait_until(
                lambda: self.replica.ready(s.index) or s.index in self._read_failed
            )
            if not ok or s.index in self._read_failed:
                # The receiver times out and reads the stripe from storage itself.
                self._send_done(s.index)
                return None
            tensor = self._stripe_tensor(s)
            return dist.isend(tensor, dst=op.peer, group=self.group, tag=s.index), tensor, False
        if not self._wait_until(lambda: s.position < self._gate()):
            return None
        state = self.replica.state(s.index)
        into = not (state in READY_STATES or state is StripeState.PUNCHED)
        if into:
            self.replica.allocate(s.file, s.offset, s.length)
            tensor = self._stripe_tensor(s)
        else:  # read from storage meanwhile (a fallback): receive and discard
            tensor = torch.empty(s.length, dtype=torch.uint8)
        return dist.irecv(tensor, src=op.peer, group=self.group, tag=s.index), tensor, into

    def _stripe_tensor(self, s: Stripe) -> torch.Tensor:
        """The stripe's bytes in the replica as a tensor (no copy: gloo reads and writes there)."""
        return torch.frombuffer(self.replica.view(s.file, s.offset, s.length), dtype=torch.uint8)

    def _complete(self, op: Op, work: Any, tensor: Any, into: bool) -> None:
        s = self.plan.stripes[op.stripe]
        if op.peer not in self._failed_peers:
            try:
                work.wait(datetime.timedelta(seconds=self.timeout_s))
            except Exception as exc:
                self._peer_failed(op.peer, f"{op.kind.value} of stripe {s.index}: {exc}")
        if op.peer in self._failed_peers:
            _ABANDONED.append((work, tensor))
            self._abandoned = True
            self._skip(op)
            return
        if op.kind is OpKind.SEND:
            self._count("sent", s.length)
            self._send_done(s.index)
        else:
            if into:
                self.replica.set_state(
                    s.index, StripeState.READY,
                    only_from=frozenset({StripeState.EMPTY, StripeState.ORPHAN}),
                )  # fmt: skip
            self._count("received", s.length)
            self._sample_peak()
        self._janitor()

    def _skip(self, op: Op) -> None:
        if op.kind is OpKind.SEND:
            self._send_done(op.stripe)
        else:
            self.replica.set_state(
                op.stripe, StripeState.ORPHAN, only_from=frozenset({StripeState.EMPTY})
            )

    def _send_done(self, stripe: int) -> None:
        with self._lock:
            left = self._pending_sends.get(stripe, 0) - 1
            self._pending_sends[stripe] = max(0, left)
            if left <= 0:
                self._unsent.discard(stripe)
        if left <= 0:
            self.replica.set_state(
                stripe, StripeState.READY, only_from=frozenset({StripeState.SENDING})
            )

    def _peer_failed(self, peer: int, why: str) -> None:
        with self._lock:
            if peer in self._failed_peers:
                return
            self._failed_peers.add(peer)
            self._last_progress = time.monotonic()
        self._fail(f"gave up on rank {peer} ({why}); its stripes are read from storage")
        for op in self.plan.schedule(self.rank):
            if op.peer == peer and op.kind is OpKind.RECV:
                self.replica.set_state(
                    op.stripe, StripeState.ORPHAN, only_from=frozenset({StripeState.EMPTY})
                )
        self._start_repair()

    def _orphan_all_expected(self) -> None:
        """A crashed exchange: nothing this rank was to receive will come."""
        for op in self.plan.schedule(self.rank):
            if op.kind is OpKind.RECV:
                self.replica.set_state(
                    op.stripe, StripeState.ORPHAN, only_from=frozenset({StripeState.EMPTY})
                )
        self._start_repair()

    # ----------------------------------------------------------------- repair
    def _holder_alive(self, stripe: int) -> bool:
        holder = self.plan.holder(self.plan.stripes[stripe], self.node)
        return self.replica.rank_alive(self.plan.topology.local_rank_of[holder])

    def _needs_fallback(self, stripe: int) -> bool:
        state = self.replica.state(stripe)
        if state is StripeState.ORPHAN or stripe in self._read_failed:
            return True
        return state is StripeState.EMPTY and not self._holder_alive(stripe)

    def _start_repair(self) -> None:
        with self._lock:
            if self._repair is not None or self._cancel.is_set():
                return
            self._repair = self._spawn(self._repair_loop, "ckpt-cluster-repair")

    def _repair_loop(self) -> None:
        """Read from storage the stripes that will not arrive, in order, within the window."""
        first = 0
        stripes = self.plan.stripes
        while not self._cancel.is_set() and first < len(stripes):
            did = False
            for k in range(first, len(stripes)):
                state = self.replica.state(k)
                if k == first and (state in READY_STATES or state is StripeState.PUNCHED):
                    first += 1
                    continue
                if stripes[k].position >= self._gate():
                    break
                if self._needs_fallback(k):
                    did |= self._fill(k)
            if not did:
                time.sleep(_POLL_MAX_S)

    def _fill(self, stripe: int) -> bool:
        """Read `stripe` from storage into the replica unless another local rank does."""
        s = self.plan.stripes[stripe]
        with self.replica.claim(stripe) as mine:
            if not mine:
                return False
            if self.replica.ready(stripe):
                return False
            n = self._read_stripe(s)
            self.replica.set_state(stripe, StripeState.READY)
        self._count("fallback", n)
        self._sample_peak()
        return True

    # ----------------------------------------------------------------- loader
    def wait_range(self, position: int, end: int) -> None:
        """Block until every stripe under ``[position, end)`` is in the replica.

        A stripe that will not arrive (its sender failed, its local holder died, or nothing
        happened for the exchange timeout) is read from storage here.
        """
        for k in self.plan.covering(position, end):
            self._wait_stripe(k)

    def _wait_stripe(self, k: int) -> None:
        deadline = time.monotonic() + self.timeout_s * 1.5
        delay = _POLL_MIN_S
        while True:
            state = self.replica.state(k)
            if state in READY_STATES:
                return
            if state is StripeState.PUNCHED or self._needs_fallback(k):
                if not self._fill(k):
                    time.sleep(0.005)  # claimed by another local rank: it fills it
                self._start_repair()
                continue
            if time.monotonic() > deadline:
                holder = self.plan.holder(self.plan.stripes[k], self.node)
                local = self.plan.topology.local_rank_of[holder]
                if local != self.local_rank:
                    self.replica.mark_failed(local)
                self._fail(f"stripe {k} did not arrive in {self.timeout_s * 1.5:.0f} s; reading it")
                self._fill(k)
                deadline = time.monotonic() + self.timeout_s * 1.5
                continue
            with self._cond:
                self._cond.wait(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def advance(self, position: int) -> None:
        """The loader consumed everything before `position`."""
        self.replica.publish(position)
        with self._cond:
            self._cond.notify_all()
        self._janitor()

    # ---------------------------------------------------------------- freeing
    def _janitor(self) -> None:
        """Free (punch) stripes every local rank is more than a trail past (window only)."""
        if self.window is None or not self._janitor_lock.acquire(blocking=False):
            return
        try:
            # A stalled local rank (marked failed) still counts here: it may come back.
            low = self.replica.slowest(grace_s=self.timeout_s, include_failed=True)
            limit = float("inf") if low is None else low - self.trail
            stripes = self.plan.stripes
            while self._punch_next < len(stripes):
                s = stripes[self._punch_next]
                if s.end > limit:
                    break
                state = self.replica.state(s.index)
                if state is StripeState.SENDING or state is StripeState.EMPTY:
                    break  # its sends are not done (or it is not here yet)
                if self.replica.set_state(
                    s.index, StripeState.PUNCHED, only_from=frozenset({StripeState.READY})
                ):
                    self._count("punched", s.length)
                self._punch_through(s.file, s.offset + s.length)
                self._punch_next += 1
        finally:
            self._janitor_lock.release()

    def _punch_through(self, file: int, end: int) -> None:
        """Punch file `file` up to `end`, whole pages only (a partial page is zeroed, not freed,
        and its other part belongs to the next stripe), the last page at the file's end."""
        page = os.sysconf("SC_PAGE_SIZE")
        top = end if end >= self.plan.sizes[file] else end - end % page
        lo = self._punched_to[file]
        if top > lo:
            self.replica.punch(file, lo, top - lo)
            self._punched_to[file] = top

    def _sample_peak(self) -> None:
        held = self.replica.allocated_bytes()
        with self._lock:
            self._peak = max(self._peak, held)

    # ------------------------------------------------------------------ end
    def finish(self) -> None:
        """The loader is done: finish the exchange (other nodes may still need this rank's
        stripes), within the timeout when nothing moves; then leave the replica."""
        self.replica.finish_consuming()
        self._janitor()
        while any(t.is_alive() for t in self._threads):
            with self._cond:
                self._cond.wait(0.05)
            self._janitor()
            if time.monotonic() - self._last_progress > self.timeout_s * 2:
                self._fail("the exchange made no progress; leaving it")
                break
        self.cancel()

    def cancel(self) -> None:
        """Stop every thread and leave the replica (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        for t in [*self._threads, *([self._repair] if self._repair else [])]:
            if t is not threading.current_thread():
                t.join(1.0)
        busy = any(t.is_alive() for t in self._threads)
        removed = self.replica.close(keep_mappings=self._abandoned or busy)
        if removed:
            log.debug("removed replica %s", self.replica.directory)
        with self._lock:
            fds, self._src_fds = list(self._src_fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self._failed_peers and not busy and not self._abandoned:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self.group)

    def report(self, **fields: Any) -> ClusterReport:
        topo = self.plan.topology
        with self._lock:
            counts = dict(self._counts)
            failures = tuple(self._failures)
            peers = tuple(sorted(self._failed_peers))
            peak = self._peak
            timeline = dict(self._timeline)
        return ClusterReport(
            scope="cluster",
            rank=self.rank,
            world=topo.world,
            node=self.node,
            nodes=topo.num_nodes,
            local_rank=self.local_rank,
            local_world=topo.local_world(self.node),
            chunk_bytes=self.plan.chunk_bytes,
            window_bytes=self.window,
            total_bytes=self.plan.total_bytes,
            planned_read_bytes=sum(s.length for s in self._own),
            read_bytes=counts.get("read", 0),
            fallback_bytes=counts.get("fallback", 0),
            sent_bytes=counts.get("sent", 0),
            received_bytes=counts.get("received", 0),
            punched_bytes=counts.get("punched", 0),
            peak_replica_bytes=peak,
            failed_peers=peers,
            failures=failures,
            elapsed_s=time.monotonic() - self._t0,
            timeline_s=timeline,
            replica_dir=str(self.replica.directory),
            **fields,
        )


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """The bytes now live in the replica: do not keep a second copy in the page cache."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


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
        session: _Session | None = None,
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
    files: Sequence[ResolvedFile], session: _Session, done: Callable[[], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor from the replica, each once its bytes are there."""
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
            waited = 0
            with safe_open(path, framework="pt") as st:
                for name, end in tensor_order(path):
                    if end > waited:
                        session.wait_range(start + waited, start + end)
                        waited = end
                    tensor = st.get_tensor(name)
                    yield name, tensor
                    del tensor
                    session.advance(start + end)
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
    total = sum(f.size for f in resolved)
    window = options.get("window_bytes", "auto")
    if window == "auto":
        window, why = auto_window(total, budget=memory_budget(), min_bytes=4 * chunk_bytes)
        log.info("cluster mode: %s", why)
    base = os.fspath(replica_dir or os.environ.get(REPLICA_DIR_ENV) or DEFAULT_REPLICA_DIR)
    need = total if window is None else min(total, 2 * int(window) + 4 * chunk_bytes)
    joined = _join(
        resolved,
        chunk_bytes=chunk_bytes,
        replica_base=base,
        need_bytes=need,
        windowed=window is not None,
        timeout_s=setup_timeout_s,
        prefetch=prefetch,
    )
    if joined.plan is None:
        return _node_local(files, prefetch, joined, options)

    plan = joined.plan
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
        # Only this rank: its peers time out on it and read its stripes from storage.
        reason = f"cannot make the replica in {base}: {exc}"
        log.warning("cluster mode: %s; this rank loads in node-local mode", reason)
        return _node_local(files, prefetch, _Joined(reason, joined.hosts), options)
    concurrency = options.get("concurrency")
    if read_threads is None and isinstance(concurrency, int) and not isinstance(concurrency, bool):
        read_threads = concurrency  # reads in flight per rank, as in node-local mode
    threads = read_threads or max(1, _NODE_STREAMS // local_world)
    session = _Session(
        plan, me, joined.group, replica, [f.path for f in resolved],
        window_bytes=window, timeout_s=exchange_timeout_s,
        read_threads=threads, inflight=DEFAULT_INFLIGHT,
    )  # fmt: skip
    log.info(
        "cluster mode: node %d of %d, local rank %d of %d, %d stripes of %d MiB, window %s, "
        "replica %s",
        node, topo.num_nodes, topo.local_rank_of[me], local_world, len(plan.stripes),
        plan.chunk_bytes >> 20, "none" if window is None else f"{window >> 20} MiB",
        replica.directory,
    )  # fmt: skip
    holder: list[ClusterWeightsIterator] = []
    gen = _replica_tensors(resolved, session, lambda: holder[0]._finish())
    weakref.finalize(gen, session.cancel)  # a generator never started runs no `finally`
    it = ClusterWeightsIterator(gen, session=session)
    holder.append(it)
    return it


def _node_local(
    files: CheckpointFiles, prefetch: Any, joined: _Joined, options: dict[str, Any]
) -> ClusterWeightsIterator:
    """Node-local mode, local ranks from the gathered hosts (no further collective)."""
    place = _local_place(joined.hosts)
    level = logging.INFO if joined.reason == ONE_NODE else logging.WARNING
    log.log(level, "cluster mode off: %s; loading in node-local mode", joined.reason)
    if place is None:
        env = (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE"))
        place = (int(env[0]), int(env[1])) if all(env) else (0, 1)  # type: ignore[arg-type]
    it = safetensors_weights_iterator(
        files, prefetch=prefetch, rank=place[0], world=place[1], **options
    )
    holder: list[ClusterWeightsIterator] = []
    gen = _node_tensors(it, lambda: holder[0]._finish())
    out = ClusterWeightsIterator(
        gen, fallback=it, reason=joined.reason,
        place={"local_rank": place[0], "local_world": place[1]},
    )  # fmt: skip
    holder.append(out)
    return out
