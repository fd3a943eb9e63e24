"""The pure core of one rank's exchange: events in, actions out. No I/O, no threads, no clock.

One rank of a cluster load reads its stripes from storage, sends them to the other nodes,
receives its share of theirs, reads from storage what will not arrive, and frees the
replica behind the slowest local rank. `StripeMachine` decides all of that; the threads of
`loader_adapter.cluster.exchange.Exchange` only carry out its actions and report back what
happened, under one lock, like h11's ``Connection`` beside its socket.

What the machine cannot know by itself is given to it as observations: the node's shared
ready map (a `Board`: other local ranks change it), how far the node may bring stripes in
(the *gate*: the slowest local consumer plus the window), how far it may free (the slowest
consumer minus the trail), and whether a local rank is alive.

Actions:

* `Read`: read an own stripe from storage into the replica;
* `Post`: start one transfer of the schedule (at most ``inflight`` at once);
* `Fill`: read a stripe from storage in place of one that will not arrive;
* `Punch`: free a stripe's bytes of the replica (mark it punched, then free whole pages);
* `Mark`: set a stripe's state in the ready map (if it is one of ``only_from``);
* `GiveUp`: a peer is given up (its stripes are read from storage by repairs);
* `Suspect`: a local rank that holds a stripe is not waited for any more.

``tests/test_cluster_machine.py`` runs any order of events and faults against it: every
stripe a node needs ends up there, nothing is freed while a local rank or a send needs it.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from loader_adapter.cluster.plan import ClusterPlan, Op, OpKind, Stripe
from loader_adapter.cluster.replica import READY_STATES, StripeState

__all__ = [
    "Action",
    "Board",
    "Fill",
    "GiveUp",
    "Mark",
    "Post",
    "Punch",
    "Read",
    "StripeMachine",
    "Suspect",
    "Tally",
]

_EMPTY = frozenset({StripeState.EMPTY})
_HERE_OR_GONE = READY_STATES | {StripeState.PUNCHED}
#: An own stripe's bytes count only if nobody freed them meanwhile (see `Mark.reread`).
_NOT_PUNCHED = frozenset(StripeState) - {StripeState.PUNCHED}
#: A fill makes a stripe ready only from where its bytes are not in the replica.
_FILLABLE = frozenset(StripeState) - READY_STATES


class Tally(enum.Enum):
    """Bytes one rank moved, by kind (the report's counters)."""

    READ = "read"
    FALLBACK = "fallback"
    SENT = "sent"
    RECEIVED = "received"
    PUNCHED = "punched"


class Board(Protocol):
    """The node's ready map as the machine sees it (`loader_adapter.cluster.replica.Replica`)."""

    def state(self, stripe: int) -> StripeState:
        """The stripe's state in the node's replica."""
        ...


@dataclass(frozen=True, slots=True)
class Read:
    """Read own stripe `stripe` from storage into the replica; report `read_done`."""

    stripe: Stripe


@dataclass(frozen=True, slots=True)
class Post:
    """Start transfer `op` on the stripe's bytes in the replica (a receive into a scratch
    buffer when `discard`: the stripe is here already); report `transfer_ended`."""

    op: Op
    discard: bool = False


@dataclass(frozen=True, slots=True)
class Fill:
    """Read `stripe` from storage (claimed among the local ranks); report `filled`."""

    stripe: int


@dataclass(frozen=True, slots=True)
class Punch:
    """Mark `stripe` punched (from ready only; report `punched` when it took), then free
    ``[offset, offset + length)`` of replica file `file` (whole pages; may be empty)."""

    stripe: int
    file: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Mark:
    """Set `stripe`'s state to `state` (only if it is one of `only_from`, when given).

    Carried out at once, under the caller's lock: when a `reread` mark does not take,
    report `StripeMachine.reread` in the same critical section (another local rank freed
    the bytes meanwhile: they must be read again before they are sent).
    """

    stripe: int
    state: StripeState
    only_from: frozenset[StripeState] | None = None
    reread: bool = False


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Peer `peer` is given up: log `why`; repairs read what it owed."""

    peer: int
    why: str


@dataclass(frozen=True, slots=True)
class Suspect:
    """Stripe `stripe` did not come in time: read it here, and stop waiting for its holder,
    local rank `local_rank` (unless that is this rank)."""

    local_rank: int
    stripe: int


Action = Read | Post | Fill | Punch | Mark | GiveUp | Suspect


class StripeMachine:
    """What one rank of a cluster load does next, from what happened so far.

    Not thread-safe: its caller holds one lock around every call.

    Args:
        plan: the job's plan.
        rank: this rank (global).
        window_bytes: the window (None: the replica holds the whole checkpoint); bounds
            the own stripes read but not yet sent.
        inflight: transfers posted and not yet ended, at most.
        trail: bytes kept behind the slowest local consumer before freeing.
        page_bytes: the page size (freeing is in whole pages).

    The repairs and the loader's waits are decided by its `recovery` (`Recovery`), freeing
    by its `freeing` (`Freeing`).

    Example:
        >>> from loader_adapter.cluster.plan import cluster_plan
        >>> m = StripeMachine(cluster_plan([8192], ["a", "b"], chunk_bytes=4096), 0,
        ...                   window_bytes=None, inflight=2)
        >>> m.next_read(float("inf"), {0: StripeState.EMPTY}.__getitem__)
        [Read(stripe=Stripe(index=0, file=0, offset=0, length=4096, position=0, unit=0, \
reader=0, receivers=(1,), nodes=None))]
    """

    def __init__(
        self,
        plan: ClusterPlan,
        rank: int,
        *,
        window_bytes: int | None,
        inflight: int,
        trail: int = 0,
        page_bytes: int = 4096,
    ) -> None:
        self.plan = plan
        self.rank = rank
        topo = plan.topology
        self.node = topo.node_of[rank]
        self.local_rank = topo.local_rank_of[rank]
        self.tally = collections.Counter[Tally]()
        self.failed_peers: set[int] = set()
        self.own = plan.reads(rank)
        self._next_read = 0
        self._schedule = plan.schedule(rank)
        self._next_op = 0
        self._posted = 0
        self._inflight = max(1, inflight)
        self._pending_sends = {s.index: len(s.receivers) for s in self.own}
        self._unsent: set[int] = set()  # read, sends pending (the window's backlog)
        self._rereading: set[int] = set()  # unsent, but freed meanwhile: read again
        self._read_failed: set[int] = set()
        self._backlog_max = (
            None if window_bytes is None else max(2, window_bytes // plan.chunk_bytes)
        )
        #: What will not arrive, and what the loader does about it.
        self.recovery = Recovery(plan, rank, self._read_failed)
        #: What this rank frees of the node's replica.
        self.freeing = Freeing(plan, self.node, trail=trail, page_bytes=page_bytes)

    # ------------------------------------------------------------------ reads
    @property
    def reads_left(self) -> bool:
        """Whether an own stripe is still to be taken by a reader."""
        return self._next_read < len(self.own)

    def next_read(self, gate: float, state: Callable[[int], StripeState]) -> list[Action] | None:
        """The next own stripe to read, if it may go now (None: wait; see `reads_left`).

        It may go below the gate, and while fewer than the window's stripes are read and
        unsent (the earliest unsent one always may: the exchange waits for it).
        """
        if not self.reads_left:
            return None
        s = self.own[self._next_read]
        if s.position >= gate:
            return None
        if (
            self._backlog_max is not None
            and len(self._unsent) >= self._backlog_max
            and s.index > min(self._unsent)
        ):
            return None
        self._next_read += 1
        if state(s.index) in READY_STATES:  # filled from storage by a repair meanwhile
            return self._read(s.index)
        return [Read(s)]

    def read_done(self, stripe: int, nbytes: int) -> list[Action]:
        """An own stripe is in the replica (`nbytes` read from storage)."""
        self.tally[Tally.READ] += nbytes
        return self._read(stripe)

    def read_failed(self, stripe: int) -> list[Action]:
        """An own stripe could not be read: its receivers and the loader read it themselves."""
        self._read_failed.add(stripe)
        return []

    def reads_lost(self) -> list[Action]:
        """A reader crashed: no own stripe left untaken will be read."""
        self._read_failed.update(s.index for s in self.own[self._next_read :])
        self._next_read = len(self.own)
        return []

    def reread(self, stripe: int) -> list[Action]:
        """A `Mark` of an own stripe did not take: it was freed (another local rank read it
        from storage and everyone consumed it) before its sends; read it again."""
        self._rereading.add(stripe)
        return [Read(self.plan.stripes[stripe])]

    def _read(self, stripe: int) -> list[Action]:
        """An own stripe's bytes are in the replica: protect them while sends are pending.

        A local rank that stopped waiting for this one may have read the stripe from
        storage, and the node freed it behind its consumers, while this rank read it: the
        mark then does not take, and the stripe is read again (`reread`).
        """
        again = stripe in self._rereading
        self._rereading.discard(stripe)
        only = None if again else _NOT_PUNCHED
        if self._pending_sends.get(stripe, 0):
            self._unsent.add(stripe)
            return [Mark(stripe, StripeState.SENDING, only, reread=not again)]
        return [Mark(stripe, StripeState.READY, only)]

    # -------------------------------------------------------------- transfers
    @property
    def posting_done(self) -> bool:
        """Whether every operation of the schedule was posted or skipped."""
        return self._next_op >= len(self._schedule)

    @property
    def posted(self) -> int:
        """Transfers posted and not yet ended."""
        return self._posted

    def next_post(self, gate: float, state: Callable[[int], StripeState]) -> list[Action] | None:
        """The next operation of the schedule, if it may start now (None: wait).

        A send waits for its stripe's read by this rank (and is dropped when the read
        failed: the receiver then reads the stripe from storage); a receive waits for the
        gate.
        """
        if self.posting_done or self._posted >= self._inflight:
            return None
        op = self._schedule[self._next_op]
        if op.peer in self.failed_peers:
            self._next_op += 1
            return self._skip(op)
        s = self.plan.stripes[op.stripe]
        if op.kind is OpKind.SEND:
            if s.index in self._read_failed:
                self._next_op += 1
                return self._send_done(s.index)
            if s.index not in self._unsent or s.index in self._rereading:
                return None  # not read (and marked) by this rank yet
            discard = False
        else:
            if s.position >= gate:
                return None
            discard = state(s.index) in _HERE_OR_GONE  # filled from storage meanwhile
        self._next_op += 1
        self._posted += 1
        return [Post(op, discard)]

    def transfer_ended(self, op: Op, *, discard: bool, error: str | None) -> list[Action]:
        """A posted transfer ended: done, failed (`error`), or abandoned (its peer given up)."""
        self._posted -= 1
        actions: list[Action] = []
        if error is not None:
            actions += self.peer_failed(op.peer, f"{op.kind.value} of stripe {op.stripe}: {error}")
        if op.peer in self.failed_peers:
            return actions + self._skip(op)
        length = self.plan.stripes[op.stripe].length
        if op.kind is OpKind.SEND:
            self.tally[Tally.SENT] += length
            return self._send_done(op.stripe)
        self.tally[Tally.RECEIVED] += length
        if discard:
            return []
        return [
            Mark(op.stripe, StripeState.READY, frozenset({StripeState.EMPTY, StripeState.ORPHAN}))
        ]

    def post_failed(self, op: Op, error: str) -> list[Action]:
        """Starting `op` failed (the pair is closed: the peer died)."""
        return self.transfer_ended(op, discard=False, error=error)

    def peer_failed(self, peer: int, why: str) -> list[Action]:
        """Give `peer` up: what it owed this rank is orphaned (read from storage)."""
        if peer in self.failed_peers:
            return []
        self.failed_peers.add(peer)
        orphans: list[Action] = [
            Mark(op.stripe, StripeState.ORPHAN, _EMPTY)
            for op in self._schedule
            if op.peer == peer and op.kind is OpKind.RECV
        ]
        return [GiveUp(peer, why), *orphans]

    def exchange_lost(self) -> list[Action]:
        """The exchange crashed: nothing this rank was to receive will come."""
        return [
            Mark(op.stripe, StripeState.ORPHAN, _EMPTY)
            for op in self._schedule
            if op.kind is OpKind.RECV
        ]

    def _skip(self, op: Op) -> list[Action]:
        if op.kind is OpKind.SEND:
            return self._send_done(op.stripe)
        return [Mark(op.stripe, StripeState.ORPHAN, _EMPTY)]

    def _send_done(self, stripe: int) -> list[Action]:
        left = self._pending_sends.get(stripe, 0) - 1
        self._pending_sends[stripe] = max(0, left)
        if left > 0:
            return []
        self._unsent.discard(stripe)
        return [Mark(stripe, StripeState.READY, frozenset({StripeState.SENDING}))]

    # ------------------------------------------------------------- what moved
    def filled(self, stripe: int, nbytes: int) -> list[Action]:
        """A stripe was read from storage in place of its transfer.

        The mark does not touch a stripe that became ready meanwhile (a local rank stopped
        mid-fill that came back after the loader read the stripe in its place, or its
        planned reader): `SENDING` must stay until the send ends, or it could be freed
        under it."""
        self.tally[Tally.FALLBACK] += nbytes
        return [Mark(stripe, StripeState.READY, only_from=_FILLABLE)]

    def punched(self, stripe: int) -> None:
        """A `Punch`'s mark took (this rank freed the stripe)."""
        self.tally[Tally.PUNCHED] += self.plan.stripes[stripe].length


class Recovery:
    """Which stripes will not arrive unless read from storage here (a peer failed, a local
    holder died or is late), for the repair thread and the loader. Part of `StripeMachine`.

    Args:
        plan: the job's plan; rank: this rank (global).
        read_failed: the own stripes whose read failed (the machine's set, shared).
    """

    def __init__(self, plan: ClusterPlan, rank: int, read_failed: set[int]) -> None:
        self.plan = plan
        self.node = plan.topology.node_of[rank]
        self.local_rank = plan.topology.local_rank_of[rank]
        self._read_failed = read_failed
        self._repair_first = 0

    def holder_local_rank(self, stripe: int) -> int:
        """The local rank that brings `stripe` into this node (reader or receiver)."""
        holder = self.plan.holder(self.plan.stripes[stripe], self.node)
        return self.plan.topology.local_rank_of[holder]

    def needs_fill(
        self, stripe: int, state: StripeState, holder_alive: Callable[[int], bool]
    ) -> bool:
        """Whether `stripe` will not arrive unless read from storage here."""
        if state is StripeState.ORPHAN or stripe in self._read_failed:
            return True
        return state is StripeState.EMPTY and not holder_alive(self.holder_local_rank(stripe))

    def repairs(
        self,
        gate: float,
        state: Callable[[int], StripeState],
        holder_alive: Callable[[int], bool],
    ) -> list[Action]:
        """The stripes below the gate to read from storage now, in order."""
        stripes = self.plan.stripes
        out: list[Action] = []
        for k in range(self._repair_first, len(stripes)):
            if not self.plan.needed_by(stripes[k], self.node):
                self._repair_first += k == self._repair_first  # another node's
                continue
            st = state(k)
            if k == self._repair_first and st in _HERE_OR_GONE:
                self._repair_first += 1
                continue
            if stripes[k].position >= gate:
                break
            if self.needs_fill(k, st, holder_alive):
                out.append(Fill(k))
        return out

    @property
    def repairs_done(self) -> bool:
        """Whether every stripe this node needs is here or freed (as of the last `repairs`)."""
        return self._repair_first >= len(self.plan.stripes)

    def loader_wait(
        self,
        stripe: int,
        state: StripeState,
        holder_alive: Callable[[int], bool],
        *,
        overdue: bool,
    ) -> list[Action] | None:
        """What the loader does for a stripe it waits for: None when the stripe is here;
        ``[]`` to wait; a `Fill` when it will not arrive (after `Suspect` when `overdue`)."""
        if state in READY_STATES:
            return None
        if not self.plan.needed_by(self.plan.stripes[stripe], self.node):
            return [Fill(stripe)]  # nobody brings an unplanned stripe: read it here
        if state is StripeState.PUNCHED or self.needs_fill(stripe, state, holder_alive):
            return [Fill(stripe)]
        if overdue:
            return [Suspect(self.holder_local_rank(stripe), stripe), Fill(stripe)]
        return []


class Freeing:
    """Which stripes of the node's replica this rank frees, in order, behind the slowest
    local consumer (window only). Part of `StripeMachine`.

    Args:
        plan: the job's plan; node: this rank's node.
        trail: bytes kept behind the slowest local consumer.
        page_bytes: the page size (freeing is in whole pages).
    """

    def __init__(self, plan: ClusterPlan, node: int, *, trail: int, page_bytes: int) -> None:
        self.plan = plan
        self.node = node
        self._trail = trail
        self._page = page_bytes
        self._punch_next = 0
        self._punched_to = [0] * len(plan.sizes)

    def punches(self, slowest: int | None, state: Callable[[int], StripeState]) -> list[Action]:
        """Stripes every local rank is more than a trail past (`slowest`: the slowest local
        consumer, None when none consumes), in order; stops at one still being sent or
        not here yet."""
        limit = float("inf") if slowest is None else slowest - self._trail
        stripes = self.plan.stripes
        out: list[Action] = []
        while self._punch_next < len(stripes):
            s = stripes[self._punch_next]
            if s.end > limit:
                break
            st = state(s.index)
            if not self.plan.needed_by(s, self.node) and st not in READY_STATES:
                self._punch_next += 1  # another node's, never here
                continue
            if st is StripeState.SENDING or st is StripeState.EMPTY:
                break
            out.append(self._punch(s))
            self._punch_next += 1
        return out

    def _punch(self, s: Stripe) -> Punch:
        """Whole pages only (a partial page is zeroed, not freed, and its other part belongs
        to the next stripe); the last page at the file's end."""
        end = s.offset + s.length
        top = end if end >= self.plan.sizes[s.file] else end - end % self._page
        lo = self._punched_to[s.file]
        self._punched_to[s.file] = max(lo, top)
        return Punch(s.index, s.file, lo, max(0, top - lo))
