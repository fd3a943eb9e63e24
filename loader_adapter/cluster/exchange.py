"""One rank's part of a cluster load: the threads that carry out `StripeMachine`'s actions.

Every decision (what to read, post, fill or free next, what a failure means) is the pure
machine's (`loader_adapter.cluster.machine`); the threads feed it what happened and what
they observe (the node's ready map, the slowest local consumer, whether a local rank is
alive) under one lock (`loader_adapter.cluster.core`), and do the I/O outside it. All of
them are daemons whose failures land in the report:

* readers read the rank's own stripes from storage into the replica, as many at once as
  the controller allows (`loader_adapter.cluster.reads`);
* a poster and a completer run the schedule's transfers (`loader_adapter.cluster.transfers`);
* a repair thread, started at the first fault, reads what will not arrive (here).

The loader's side (`Exchange.wait_range`, `advance`, `finish`) runs on the loader's
thread, and so does freeing, beside the completer. ``docs/cluster.md`` has the design.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from engine.memory import trail_bytes
from loader_adapter.cluster.core import POLL_MAX_S, POLL_MIN_S, Core
from loader_adapter.cluster.machine import Fill, GiveUp, Punch, StripeMachine, Suspect, Tally
from loader_adapter.cluster.plan import ClusterPlan
from loader_adapter.cluster.reads import Readers
from loader_adapter.cluster.replica import Replica, StripeState
from loader_adapter.cluster.report import ClusterReport
from loader_adapter.cluster.storage import StripeReader
from loader_adapter.cluster.transfers import Transfers
from loader_adapter.cluster.transport import Transport

__all__ = ["DEFAULT_INFLIGHT", "Exchange"]

log = logging.getLogger(__name__)

#: Transfers in flight per rank (each on its stripe's bytes: no extra buffer).
DEFAULT_INFLIGHT = 4
_READY = frozenset({StripeState.READY})


class Exchange:
    """One rank's part of a cluster-mode load: its threads, the machine and the replica.

    Started by `loader_adapter.cluster.cluster_weights_iterator` once the job agreed on
    cluster mode; the loader calls `wait_range`, `advance` and, at the end, `finish` (or
    `cancel` when it stops early), then `report`.

    Args:
        plan: the job's plan; rank: this rank (global).
        transport: how stripes travel (`loader_adapter.cluster.transport.GlooTransport`).
        replica: the node's replica, opened by this rank.
        sources: the checkpoint's files, in consumption order.
        window_bytes: the window (None: the replica holds the whole checkpoint).
        timeout_s: how long a transfer or a stripe may wait before its peer is given up.
        read_threads: storage reads in flight to start with.
        inflight: transfers in flight.
        max_read_threads: adapt the reads in flight at run time up to this (None: fixed).

    Example:
        >>> ex = Exchange(plan, rank, GlooTransport(group), replica, paths,  # doctest: +SKIP
        ...               window_bytes=None, timeout_s=60, read_threads=2)
        >>> ex.wait_range(0, 4096); ex.advance(4096); ex.finish()  # doctest: +SKIP
    """

    def __init__(
        self,
        plan: ClusterPlan,
        rank: int,
        transport: Transport,
        replica: Replica,
        sources: Sequence[str],
        *,
        window_bytes: int | None,
        timeout_s: float,
        read_threads: int,
        inflight: int = DEFAULT_INFLIGHT,
        max_read_threads: int | None = None,
    ) -> None:
        self.plan, self.rank, self.replica = plan, rank, replica
        self.window = window_bytes
        self.timeout_s = timeout_s
        local_world = plan.topology.local_world(plan.topology.node_of[rank])
        trail = 0
        if window_bytes is not None:
            trail = trail_bytes(window_bytes, chunk_bytes=plan.chunk_bytes, world=local_world)
        self.machine = StripeMachine(
            plan, rank, window_bytes=window_bytes, inflight=inflight, trail=trail,
            page_bytes=os.sysconf("SC_PAGE_SIZE"),
        )  # fmt: skip
        storage = StripeReader(sources, replica, lambda n: self._readers.progress(n))
        self._core = core = Core(
            self.machine, replica, storage, window_bytes=window_bytes, timeout_s=timeout_s
        )
        core.handlers.update({Fill: lambda a: self._fill(a.stripe), Punch: self._punch,
                              GiveUp: self._give_up, Suspect: self._suspect})  # fmt: skip
        self._janitor_lock = threading.Lock()
        self._stopped = False
        self._repair: threading.Thread | None = None
        self._published = 0  # the loader's position
        self._readers = Readers(
            core, read_threads=read_threads, max_read_threads=max_read_threads,
            local_world=local_world,
        )  # fmt: skip
        self._transfers = Transfers(
            core, transport, on_crash=self._exchange_lost, after_each=self._janitor
        )
        self._threads = [*self._readers.start(), *self._transfers.threads]

    # ----------------------------------------------------------------- acting
    def _fill(self, stripe: int, *, steal: bool = False) -> bool:
        """Read `stripe` from storage unless it is here, or another local rank or thread
        claimed it (with `steal`: unless a thread of this process did).

        A claim is a lock that dies with its process, not with a stop: a local rank stopped
        while it filled a stripe holds its claim until it comes back. The loader steals a
        stripe that is overdue from another process: both write the same bytes from
        storage. A thread of this process that holds a claim is alive, and only slow.
        """
        core = self._core
        with self.replica.claim(stripe) as mine:
            if self.replica.ready(stripe):
                return False
            if not mine and (not steal or self.replica.claimed_here(stripe)):
                return False
            n = core.storage.read(self.plan.stripes[stripe])
            core.step(self.machine.filled, stripe, n)
        core.note(Tally.FALLBACK)
        return True

    def _punch(self, a: Punch) -> None:
        if self.replica.set_state(a.stripe, StripeState.PUNCHED, only_from=_READY):
            with self._core.cond:
                self.machine.punched(a.stripe)
            self._core.note(Tally.PUNCHED)
        self.replica.punch(a.file, a.offset, a.length)

    def _give_up(self, a: GiveUp) -> None:
        self._core.fail(f"gave up on rank {a.peer} ({a.why}); its stripes are read from storage")
        self._core.note(None)
        self._start_repair()

    def _suspect(self, a: Suspect) -> None:
        if a.local_rank != self.machine.local_rank:
            self.replica.ranks.mark_failed(a.local_rank)
        late = f"{self.timeout_s * 1.5:.0f} s"
        self._core.fail(f"stripe {a.stripe} did not arrive in {late}; reading it")

    def _exchange_lost(self) -> None:
        """A crashed poster or completer: nothing this rank was to receive will come."""
        self._core.step(self.machine.exchange_lost)
        self._start_repair()

    # ----------------------------------------------------------------- repair
    def _start_repair(self) -> None:
        core = self._core
        with core.cond:
            if self._repair is not None or core.cancelled.is_set():
                return
            self._repair = core.spawn(self._repair_loop, "ckpt-cluster-repair")

    def _repair_loop(self) -> None:
        """Read from storage the stripes that will not arrive, in order, within the window."""
        core, recovery = self._core, self.machine.recovery
        while not core.cancelled.is_set():
            with core.cond:
                fills = recovery.repairs(core.gate(), self.replica.state, core.holder_alive)
                if recovery.repairs_done:
                    return
            if not any([self._fill(f.stripe) for f in fills if isinstance(f, Fill)]):
                time.sleep(POLL_MAX_S)

    # ------------------------------------------------------------------ loader
    def wait_range(self, position: int, end: int) -> None:
        """Block until every stripe under ``[position, end)`` is in the replica.

        A stripe that will not arrive (its sender failed, its local holder died, or nothing
        happened for 1.5 exchange timeouts) is read from storage here. The loader needs
        nothing before `position` any more: with ``tensors=`` the next range it loads may
        lie more than a window past the last one it loaded, and the window must follow it
        there (it waited a timeout for a stripe outside the window before).
        """
        if position > self._published:
            self.advance(position)
        for k in self.plan.covering(position, end):
            self._wait_stripe(k)

    def _wait_stripe(self, k: int) -> None:
        patience = self.timeout_s * 1.5
        deadline = time.monotonic() + patience
        delay = POLL_MIN_S
        while True:
            overdue = time.monotonic() > deadline
            with self._core.cond:
                actions = self.machine.recovery.loader_wait(
                    k, self.replica.state(k), self._core.holder_alive, overdue=overdue
                )
                if actions == []:
                    self._core.cond.wait(delay)
                    delay = min(delay * 2, POLL_MAX_S)
                    continue
            if actions is None:
                return
            self._core.do([a for a in actions if not isinstance(a, Fill)])
            filled = self._fill(k, steal=overdue)
            if overdue:
                deadline = time.monotonic() + patience
            elif not filled:
                time.sleep(0.005)  # claimed by another local rank: it fills it
            if self.plan.needed_by(self.plan.stripes[k], self.machine.node):
                self._start_repair()

    def advance(self, position: int) -> None:
        """The loader consumed everything before `position`."""
        self._published = max(self._published, position)
        self.replica.ranks.publish(self._published)
        with self._core.cond:
            self._core.cond.notify_all()
        self._janitor()

    def _janitor(self) -> None:
        """Free what every local rank is a trail past (window only; one thread at a time)."""
        if self.window is None or not self._janitor_lock.acquire(blocking=False):
            return
        try:
            # A stalled local rank (marked failed) still counts here: it may come back.
            low = self.replica.ranks.slowest(grace_s=self.timeout_s, include_failed=True)
            with self._core.cond:
                punches = self.machine.freeing.punches(low, self.replica.state)
            self._core.do(punches)
        finally:
            self._janitor_lock.release()

    # --------------------------------------------------------------------- end
    def finish(self) -> None:
        """The loader is done: finish the exchange (other nodes may still need this rank's
        stripes), within the timeout when nothing moves; then leave the replica."""
        self.replica.ranks.finish_consuming()
        self._janitor()
        while any(t.is_alive() for t in self._threads):
            with self._core.cond:
                self._core.cond.wait(0.05)
            self._janitor()
            if time.monotonic() - self._core.last_progress > self.timeout_s * 2:
                self._core.fail("the exchange made no progress; leaving it")
                break
        self.cancel()

    def cancel(self) -> None:
        """Stop every thread and leave the replica (idempotent)."""
        with self._core.cond:
            if self._stopped:
                return
            self._stopped = True
            self._core.cancelled.set()
            self._core.cond.notify_all()
        for t in [*self._threads, *([self._repair] if self._repair else [])]:
            if t is not threading.current_thread():
                t.join(1.0)
        busy = any(t.is_alive() for t in self._threads)
        if self.replica.close(keep_mappings=self._transfers.abandoned or busy):
            log.debug("removed replica %s", self.replica.directory)
        self._core.storage.close()
        # A gloo group stays until the process exits: destroying it closes this rank's
        # connections, and a peer may not have read the last bytes sent on one yet.

    def report(self, **fields: Any) -> ClusterReport:
        """What this rank did so far (`fields` override the report's fields)."""
        topo, m = self.plan.topology, self.machine
        with self._core.cond:
            tally = dict(m.tally)
            core = self._core
            failures, timeline, peak = tuple(core.failures), dict(core.timeline), core.peak
            peers = tuple(sorted(m.failed_peers))
        tuning = self._readers.summary()
        return ClusterReport(
            scope="cluster", rank=self.rank, world=topo.world, node=m.node, nodes=topo.num_nodes,
            local_rank=m.local_rank, local_world=topo.local_world(m.node),
            chunk_bytes=self.plan.chunk_bytes, window_bytes=self.window,
            total_bytes=self.plan.total_bytes,
            planned_read_bytes=sum(s.length for s in m.own),
            read_bytes=tally.get(Tally.READ, 0), fallback_bytes=tally.get(Tally.FALLBACK, 0),
            sent_bytes=tally.get(Tally.SENT, 0), received_bytes=tally.get(Tally.RECEIVED, 0),
            punched_bytes=tally.get(Tally.PUNCHED, 0), peak_replica_bytes=peak,
            failed_peers=peers, failures=failures, elapsed_s=time.monotonic() - self._core.t0,
            timeline_s=timeline, replica_dir=str(self.replica.directory), tuning=tuning,
            **fields,
        )  # fmt: skip
