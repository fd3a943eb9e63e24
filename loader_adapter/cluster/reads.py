"""The reader threads of one rank's exchange: its own stripes, from storage.

As many readers wait as the controller may ever allow; the first ``allowed`` of them read.
``allowed`` is fixed, or set once an interval by the node-local prefetch's controller
(`engine.pace`) from the rate this rank reads at, so cluster mode adapts like node-local
mode does.
"""

from __future__ import annotations

import threading

from engine.pace import Pace
from loader_adapter.cluster.core import Core
from loader_adapter.cluster.machine import Read, Tally

__all__ = ["Readers"]


class Readers:
    """Reads this rank's own stripes (the machine's `Read` actions).

    Args:
        core: the exchange's shared core (its `Read` handler is set here).
        read_threads: storage reads in flight to start with.
        max_read_threads: adapt the reads in flight at run time up to this (None: fixed).
        local_world: ranks on this node (the controller's frontier).
    """

    def __init__(
        self, core: Core, *, read_threads: int, max_read_threads: int | None, local_world: int
    ) -> None:
        self.core = core
        self.allowed = max(1, read_threads)
        self.pace: Pace | None = None
        self._read_so_far = 0
        n = self.allowed
        if max_read_threads is not None and max_read_threads > self.allowed:
            n = max_read_threads
            chunk = core.machine.plan.chunk_bytes
            self.pace = Pace(n, chunk, local_world, None, streams=self.allowed)
        self._threads = n
        core.handlers[Read] = self.read

    def start(self) -> list[threading.Thread]:
        """Start the reader threads; returns them."""
        core = self.core
        lost = lambda: core.step(core.machine.reads_lost)  # noqa: E731
        return [
            core.spawn(lambda i=i: self._loop(i), f"ckpt-cluster-read-{i}", lost)
            for i in range(self._threads)
        ]

    def _loop(self, i: int) -> None:
        core, m = self.core, self.core.machine
        while True:
            actions = core.decide(
                lambda: m.next_read(core.gate(), core.replica.state) if i < self.allowed else None,
                lambda: not m.reads_left,
            )
            if actions is None:
                return
            core.do(actions)

    def read(self, a: Read) -> None:
        """Carry out a `Read`: the stripe into the replica, then tell the machine."""
        core, s = self.core, a.stripe
        try:
            n = core.storage.read(s)
        except Exception as exc:  # the stripe is lost, the other stripes are not
            path = core.storage.sources[s.file]
            core.fail(f"reading {path} [{s.offset}, +{s.length}): {exc!r}")
            core.step(core.machine.read_failed, s.index)
            return
        core.step(core.machine.read_done, s.index, n)
        core.note(Tally.READ)

    def progress(self, nbytes: int) -> None:
        """Bytes landed from storage: once an interval, the controller sets ``allowed``."""
        pace = self.pace
        if pace is None:
            return
        with self.core.cond:
            self._read_so_far += nbytes
            if pace.due():
                pace.tick(self._read_so_far, None)
                self.allowed = pace.setting.streams
                self.core.cond.notify_all()

    def summary(self) -> str:
        """How many storage reads were in flight, for the report."""
        if self.pace is not None:
            return self.pace.summary()
        return f"fixed: {self.allowed} storage read(s) in flight"
