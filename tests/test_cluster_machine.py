"""The exchange's pure state machine under any order of events and faults.

A whole job is simulated in one process without threads: one `StripeMachine` per rank,
one ready map per node, the transfers matched by (sender, receiver, stripe) as a
rendezvous transport matches them, and one consumer per rank that walks the stripes its
node needs. Hypothesis picks which enabled event happens next (a read or a transfer
ending, a post, a repair, a consumer step, freeing), when reads and transfers fail and
which ranks die; then the job is drained. Whatever the order:

* a consumer takes a stripe only when its bytes are in its node's replica;
* nothing is freed while a live local consumer still needs it, or a send still reads it;
* without faults, each stripe a node needs is brought into it exactly once (never read
  from storage in place of a transfer, never twice);
* with faults, every live rank still gets every stripe its node needs (no deadlock).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from loader_adapter.cluster.machine import (
    Fill,
    GiveUp,
    Mark,
    Post,
    Punch,
    Read,
    StripeMachine,
    Suspect,
    Tally,
)
from loader_adapter.cluster.plan import ClusterPlan, Op, OpKind, cluster_plan
from loader_adapter.cluster.replica import READY_STATES, StripeState

_OK = frozenset(READY_STATES)


@dataclass
class Rank:
    machine: StripeMachine
    alive: bool = True
    reading: list[int] = field(default_factory=list)
    posted: list[Post] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # stripes its consumer still takes
    position: int = 0
    failed_mark: bool = False  # suspected by a local rank


class Job:
    """The simulated job: machines, ready maps, the bytes in each replica, the checks."""

    def __init__(self, plan: ClusterPlan, window: int | None, trail: int, inflight: int) -> None:
        self.plan = plan
        self.window = window
        topo = plan.topology
        self.ranks = [
            Rank(StripeMachine(plan, r, window_bytes=window, inflight=inflight, trail=trail))
            for r in range(topo.world)
        ]
        self.trail = trail
        self.boards = [dict.fromkeys(range(len(plan.stripes)), StripeState.EMPTY)
                       for _ in topo.nodes]  # fmt: skip
        self.here = [set[int]() for _ in topo.nodes]  # stripes whose bytes are in the replica
        self.arrivals = [dict[int, int]() for _ in topo.nodes]  # stripe -> times brought in
        self.fills = 0
        self.timeouts = 0
        self.ended = set[tuple[int, int, int]]()  # (rank, peer, stripe) transfers ended
        for r, rank in enumerate(self.ranks):
            node = topo.node_of[r]
            rank.todo = [s.index for s in plan.stripes if plan.needed_by(s, node)]
            rank.position = plan.stripes[rank.todo[0]].position if rank.todo else 0

    # ------------------------------------------------------------- observations
    def node(self, r: int) -> int:
        return self.plan.topology.node_of[r]

    def local(self, r: int) -> list[Rank]:
        return [self.ranks[g] for g in self.plan.topology.nodes[self.node(r)]]

    def slowest(self, r: int, *, include_failed: bool) -> int | None:
        positions = [
            x.position
            for x in self.local(r)
            if x.alive and x.todo and (include_failed or not x.failed_mark)
        ]
        return min(positions, default=None)

    def gate(self, r: int) -> float:
        low = self.slowest(r, include_failed=False)
        return float("inf") if self.window is None or low is None else low + self.window

    def alive_local(self, r: int):
        node_ranks = self.plan.topology.nodes[self.node(r)]
        return lambda local: (
            self.ranks[node_ranks[local]].alive and not (self.ranks[node_ranks[local]].failed_mark)
        )

    # ----------------------------------------------------------------- acting
    def do(self, r: int, actions) -> None:
        node, board = self.node(r), self.boards[self.node(r)]
        for a in actions:
            if isinstance(a, Mark):
                if a.only_from is None or board[a.stripe] in a.only_from:
                    self.set(node, a.stripe, a.state)
                elif a.reread:
                    self.do(r, self.ranks[r].machine.reread(a.stripe))
            elif isinstance(a, Read):
                self.ranks[r].reading.append(a.stripe.index)
            elif isinstance(a, Post):
                if a.op.kind is OpKind.SEND:
                    assert a.op.stripe in self.here[node], "sent bytes that are not there"
                self.ranks[r].posted.append(a)
            elif isinstance(a, Fill):
                self.fill(r, a.stripe)
            elif isinstance(a, Punch):
                self.check_punch(r, a.stripe)
                if board[a.stripe] is StripeState.READY:
                    self.set(node, a.stripe, StripeState.PUNCHED)
                    self.here[node].discard(a.stripe)
                    self.ranks[r].machine.punched(a.stripe)
            elif isinstance(a, Suspect):
                if a.local_rank != self.ranks[r].machine.local_rank:
                    self.ranks[self.plan.topology.nodes[node][a.local_rank]].failed_mark = True
            else:
                assert isinstance(a, GiveUp)

    def set(self, node: int, stripe: int, state: StripeState) -> None:
        board = self.boards[node]
        if state in _OK and board[stripe] not in _OK:
            assert stripe in self.here[node], "marked ready before its bytes were written"
            self.arrivals[node][stripe] = self.arrivals[node].get(stripe, 0) + 1
        board[stripe] = state

    def fill(self, r: int, stripe: int) -> None:
        node = self.node(r)
        if self.boards[node][stripe] in _OK:
            return  # Exchange._fill skips a stripe that is here
        self.fills += 1
        self.here[node].add(stripe)
        self.do(r, self.ranks[r].machine.filled(stripe, self.plan.stripes[stripe].length))

    def check_punch(self, r: int, stripe: int) -> None:
        s = self.plan.stripes[stripe]
        for x in self.local(r):
            if x.alive and x.todo:
                assert x.position >= s.end + self.trail or stripe not in x.todo, (
                    "freed while a local rank still needs it"
                )
        for x in self.local(r):
            sending = [p for p in x.posted if p.op.kind is OpKind.SEND and p.op.stripe == stripe]
            assert not (x.alive and sending), "freed while a send still reads it"

    # ----------------------------------------------------------------- events
    def events(self, faults: bool) -> list[tuple]:
        """Every event that may happen now."""
        out: list[tuple] = []
        for r, x in enumerate(self.ranks):
            if not x.alive:
                continue
            out += [("next_read", r), ("next_post", r), ("repair", r), ("janitor", r)]
            out += [
                ("read_done", r, k, ok) for k in x.reading for ok in (True, False)[: 1 + faults]
            ]
            for p in x.posted:
                if self.transfer_can_end(r, p.op):
                    out.append(("transfer", r, p, None))
                if faults or not self.ranks[p.op.peer].alive:
                    out.append(("transfer", r, p, "failed"))
            if x.todo:
                out.append(("consume", r, False))
                if faults:
                    out.append(("consume", r, True))
            if faults:
                out.append(("die", r))
        return out

    def transfer_can_end(self, r: int, op: Op) -> bool:
        """A rendezvous: both sides posted, or the other side already ended."""
        peer = self.ranks[op.peer]
        if not peer.alive:
            return False
        twin = Op(op.stripe, OpKind.RECV if op.kind is OpKind.SEND else OpKind.SEND, r)
        return any(p.op == twin for p in peer.posted) or (op.peer, r, op.stripe) in self.ended

    def stuck(self) -> list[tuple]:
        """Transfers that can never end: what the exchange timeout ends."""
        return [
            ("transfer", r, p, "timed out")
            for r, x in enumerate(self.ranks)
            if x.alive
            for p in x.posted
            if not self.transfer_can_end(r, p.op)
        ]

    def signature(self) -> tuple:
        return (
            tuple(tuple(b.values()) for b in self.boards),
            tuple((len(x.todo), len(x.posted), len(x.reading), x.alive) for x in self.ranks),
            tuple((x.machine._next_read, x.machine._next_op) for x in self.ranks),
        )

    def step(self, event: tuple) -> None:
        kind, r = event[0], event[1]
        x, m = self.ranks[r], self.ranks[r].machine
        state = self.boards[self.node(r)].__getitem__
        if kind == "next_read":
            self.do(r, m.next_read(self.gate(r), state) or [])
        elif kind == "next_post":
            self.do(r, m.next_post(self.gate(r), state) or [])
        elif kind == "repair":
            self.do(r, m.recovery.repairs(self.gate(r), state, self.alive_local(r)))
        elif kind == "janitor" and self.window is not None:
            self.do(r, m.freeing.punches(self.slowest(r, include_failed=True), state))
        elif kind == "read_done":
            k, ok = event[2], event[3]
            x.reading.remove(k)
            if ok:
                self.here[self.node(r)].add(k)
                self.do(r, m.read_done(k, self.plan.stripes[k].length))
            else:
                self.do(r, m.read_failed(k))
        elif kind == "transfer":
            post, error = event[2], event[3]
            x.posted.remove(post)
            op = post.op
            if error is None:
                self.ended.add((r, op.peer, op.stripe))
            if error is None and op.kind is OpKind.RECV and not post.discard:
                self.here[self.node(r)].add(op.stripe)
            self.do(r, m.transfer_ended(op, discard=post.discard, error=error))
        elif kind == "consume":
            self.consume(r, overdue=event[2])
        elif kind == "die":
            x.alive = False
            x.reading.clear()
            x.posted.clear()

    def consume(self, r: int, *, overdue: bool) -> None:
        x = self.ranks[r]
        k = x.todo[0]
        node = self.node(r)
        actions = x.machine.recovery.loader_wait(
            k, self.boards[node][k], self.alive_local(r), overdue=overdue
        )
        if actions is None:
            assert k in self.here[node], "a consumer took a stripe whose bytes are not there"
            x.todo.pop(0)
            x.position = self.plan.stripes[x.todo[0]].position if x.todo else self.plan.total_bytes
            return
        self.do(r, actions)


@st.composite
def jobs(draw):
    nodes = draw(st.integers(2, 3))
    per_node = draw(st.integers(1, 2))
    hosts = [f"h{r % nodes}" for r in range(nodes * per_node)]
    chunk = 4096
    sizes = draw(st.lists(st.integers(1, 6 * chunk), min_size=1, max_size=3))
    needs = None
    if draw(st.booleans()):
        total = [(i, s) for i, s in enumerate(sizes)]
        needs = [
            draw(st.one_of(st.none(), st.just({i: [(0, s // 2)] for i, s in total}),
                           st.just({i: [(s // 3, s)] for i, s in total})))
            for _ in range(nodes)
        ]  # fmt: skip
    plan = cluster_plan(sizes, hosts, chunk_bytes=chunk, node_needs=needs)
    window = draw(st.one_of(st.none(), st.integers(2, 5).map(lambda w: w * chunk)))
    trail = 0 if window is None else draw(st.sampled_from([0, chunk]))
    return Job(plan, window, trail, inflight=draw(st.integers(1, 3)))


def _run(job: Job, data, *, faults: bool, steps: int) -> None:
    for _ in range(steps):
        events = job.events(faults)
        if not events:
            break
        job.step(data.draw(st.sampled_from(events), label="event"))
    # Drain: no more faults; what can happen happens, in a fixed order; when nothing moves,
    # the timeouts act (stuck transfers end in errors, consumers stop waiting).
    polls = ("next_read", "next_post", "repair", "janitor", "consume")
    for _ in range(5_000):
        events = [e for e in job.events(False) if not (e[0] == "transfer" and e[3])]
        progress = [e for e in events if e[0] not in polls]
        if not any(x.alive and x.todo for x in job.ranks) and not progress:
            return
        if progress:
            job.step(progress[0])
            continue
        before = job.signature()
        for e in events:
            job.step(e)
        if job.signature() == before:
            job.timeouts += 1
            for e in job.stuck():
                job.step(e)
            for r, x in enumerate(job.ranks):
                if x.alive and x.todo:
                    job.consume(r, overdue=True)
    raise AssertionError("the job did not finish: a stripe never came")


@settings(max_examples=150, deadline=None)
@given(job=jobs(), data=st.data())
def test_any_order_brings_every_needed_stripe_once_and_frees_nothing_in_use(job, data):
    _run(job, data, faults=False, steps=300)
    assert job.timeouts == 0  # nothing waited for a timeout
    assert job.fills == 0  # nothing read from storage in place of a transfer
    for node in range(job.plan.topology.num_nodes):
        needed = {s.index for s in job.plan.stripes if job.plan.needed_by(s, node)}
        assert {k for k, n in job.arrivals[node].items() if n} == needed
        assert all(n == 1 for n in job.arrivals[node].values())
    read = sum(x.machine.tally[Tally.READ] for x in job.ranks)
    assert read == sum(s.length for s in job.plan.stripes)  # each planned byte read once


@settings(max_examples=200, deadline=None)
@given(job=jobs(), data=st.data())
def test_any_faults_still_bring_every_live_rank_what_it_needs(job, data):
    _run(job, data, faults=True, steps=300)
    for x in job.ranks:
        assert not x.alive or not x.todo
