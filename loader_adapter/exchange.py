"""The exchange of one rank in cluster mode: storage reads, transfers, repairs, freeing.

Threads of one rank (`Exchange`), all daemon threads whose failures land in the report:

* readers read the rank's stripes (`engine.cluster_plan`) from storage into the node's
  replica (`engine.replica`), in consumption order, within the window;
* a poster posts the rank's gloo sends and receives in the schedule's order, each on the
  stripe's bytes in the replica (no extra buffer), at most `DEFAULT_INFLIGHT` at once;
* a completer waits for them in order, each with the exchange timeout, and marks stripes
  ready; a peer whose transfer fails or times out is given up and the stripes it owed are
  marked ``ORPHAN``;
* a repair thread, started at the first fault seen, reads ``ORPHAN`` stripes and those of
  a dead local rank from storage, claimed per stripe among the local ranks.

The loader's side (`Exchange.wait_range`) waits for a range's stripes and reads from
storage itself what will not come. Freeing (hole punching behind the slowest local rank)
runs on the loader's and the completer's threads. ``docs/cluster.md`` has the design.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.adapt import MIN_READ_BYTES
from engine.cluster_plan import ClusterPlan, Op, OpKind, Stripe
from engine.memory import trail_bytes
from engine.mounts import read_ahead_bytes
from engine.pace import Pace
from engine.replica import READY_STATES, Replica, StripeState
from loader_adapter.options import Scope

__all__ = ["DEFAULT_INFLIGHT", "ClusterReport", "Exchange"]

log = logging.getLogger(__name__)

#: Exchange operations in flight per rank (each is a stripe: no extra buffer is used).
DEFAULT_INFLIGHT = 4
#: The end of each stripe read without read-ahead: this many read-ahead windows, at least
#: `_MIN_TAIL_BYTES` (see `Exchange._read_stripe`).
_TAIL_WINDOWS = 2
_MIN_TAIL_BYTES = 256 << 10
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.02
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


class Exchange:
    """One rank's part of a cluster-mode load: its threads, counters and the replica.

    Started by `loader_adapter.cluster.cluster_weights_iterator` once the job agreed on
    cluster mode; the loader calls `wait_range`, `advance` and, at the end, `finish` (or
    `cancel` when it stops early), then `report`.
    """

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
        max_read_threads: int | None = None,
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
        # Storage reads in flight: fixed, or adapted at run time like a node-local prefetch
        # (`engine.pace`): `max_read_threads` readers wait, the first `_allowed` of them read.
        self._allowed = max(1, read_threads)
        self._pace: Pace | None = None
        self._read_so_far = 0  # bytes read from storage, counted per piece
        n_threads = self._allowed
        if max_read_threads is not None and max_read_threads > self._allowed:
            n_threads = max_read_threads
            self._pace = Pace(
                max_read_threads, plan.chunk_bytes, topo.local_world(self.node), None,
                streams=self._allowed,
            )  # fmt: skip
        for i in range(n_threads):
            self._threads.append(
                self._spawn(
                    lambda i=i: self._read_loop(i), f"ckpt-cluster-read-{i}", self._reads_lost
                )
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
        self._progress(n)
        # The head in pieces: the controller measures the rate per interval, and a whole
        # stripe per count makes that rate jump in stripes (noise it would not climb on).
        for off in range(0, head, MIN_READ_BYTES):
            k = self.replica.fill_from(
                s.file, s.offset + off, min(MIN_READ_BYTES, head - off), self._src_fd(s.file)
            )
            self._progress(k)
            n += k
        _drop_cache(self._src_fd(s.file), s.offset, s.length)
        return n

    def _progress(self, n: int) -> None:
        if self._pace is not None:
            with self._lock:
                self._read_so_far += n
            self._adapt()

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
    def _read_loop(self, i: int = 0) -> None:
        backlog_max = None if self.window is None else max(2, self.window // self.plan.chunk_bytes)
        while not self._cancel.is_set():
            if i >= self._allowed and not self._wait_until(
                lambda: i < self._allowed or self._next_read >= len(self._own)
            ):
                return
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

    def _adapt(self) -> None:
        """Once an interval, let the controller set the storage reads in flight."""
        pace = self._pace
        if pace is None or not pace.due():
            return
        with self._cond:
            if not pace.due():  # another reader decided meanwhile
                return
            pace.tick(self._read_so_far, None)
            self._allowed = pace.setting.streams
            self._cond.notify_all()

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
        return self.replica.rank_alive(
            self.plan.topology.local_rank_of[holder], grace_s=self.timeout_s
        )

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
                if not self.plan.needed_by(stripes[k], self.node):
                    first += k == first  # another node's: nothing to repair here
                    continue
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
        if not self.plan.needed_by(self.plan.stripes[k], self.node):
            # Not planned for this node (its ranks said they do not load these bytes), so
            # nobody brings it: read it here rather than hand out a hole.
            while not self.replica.ready(k) and not self._fill(k):
                time.sleep(0.005)  # claimed by another local rank: it fills it
            return
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
                if not self.plan.needed_by(s, self.node) and not self.replica.ready(s.index):
                    self._punch_next += 1  # another node's, never here
                    continue
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
        # The gloo group stays until the process exits: destroying it closes this rank's
        # connections, and a peer may not have read the last bytes sent on one yet.

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
            tuning=(
                self._pace.summary()
                if self._pace is not None
                else f"fixed: {self._allowed} storage read(s) in flight"
            ),
            **fields,
        )


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """The bytes now live in the replica: do not keep a second copy in the page cache."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
