"""What the threads of one rank's exchange share: the machine under one lock, and acting.

`Core` feeds `StripeMachine` events under its lock, carries out the `Mark` actions in the
same critical section (so this rank's threads never see the machine and the ready map
disagree), and hands every other action to the handler registered for its type: reads
(`loader_adapter.cluster.reads`), transfers (`loader_adapter.cluster.transfers`), fills,
punches and give-ups (`loader_adapter.cluster.exchange`). It also keeps the notes the
report is made of.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from loader_adapter.cluster.machine import Action, Mark, StripeMachine, Tally
from loader_adapter.cluster.replica import Replica
from loader_adapter.cluster.storage import StripeReader

__all__ = ["Core"]

log = logging.getLogger(__name__)

#: The shortest wait between two looks at the ready map.
POLL_MIN_S = 0.0005
#: The longest a thread waits between two looks at the ready map (other local ranks
#: change it from other processes, unseen by this lock).
POLL_MAX_S = 0.02


class Core:
    """The machine, the replica and the shared notes of one rank's exchange.

    Args:
        machine: the rank's stripe machine.
        replica: the node's replica, opened by this rank.
        storage: reads stripes from storage into the replica.
        window_bytes: the window (None: the replica holds the whole checkpoint).
        timeout_s: how long a transfer or a local rank may keep this one waiting.
    """

    def __init__(
        self,
        machine: StripeMachine,
        replica: Replica,
        storage: StripeReader,
        *,
        window_bytes: int | None,
        timeout_s: float,
    ) -> None:
        self.machine = machine
        self.replica = replica
        self.storage = storage
        self.window = window_bytes
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.cancelled = threading.Event()
        self.handlers: dict[type, Callable[[Any], None]] = {}
        self.t0 = self.last_progress = time.monotonic()
        self.failures: list[str] = []
        self.timeline: dict[str, float] = {}
        self.peak = 0

    # ------------------------------------------------------------ the machine
    def step(self, event: Callable[..., list[Action] | None], *args: Any, **kw: Any) -> None:
        """Feed the machine one event (under the lock) and carry out its actions."""
        with self.cond:
            actions = self.mark(event(*args, **kw) or [])
            self.cond.notify_all()
        self.do(actions)

    def mark(self, actions: Sequence[Action]) -> list[Action]:
        """Carry out the `Mark` actions now (the caller holds the lock); return the others."""
        out: list[Action] = []
        for a in actions:
            if not isinstance(a, Mark):
                out.append(a)
            elif not self.replica.set_state(a.stripe, a.state, only_from=a.only_from) and a.reread:
                out += self.machine.reread(a.stripe)
        return out

    def decide(
        self, decide: Callable[[], list[Action] | None], done: Callable[[], bool]
    ) -> list[Action] | None:
        """Ask `decide` (under the lock) until it has actions; None once `done()` or cancelled.

        Polls with a growing delay: other local ranks change the ready map and the
        consumer positions from other processes.
        """
        delay = POLL_MIN_S
        while not self.cancelled.is_set():
            with self.cond:
                if done():
                    return None
                actions = decide()
                if actions is not None:
                    return self.mark(actions)
                self.cond.wait(delay)
            delay = min(delay * 2, POLL_MAX_S)
        return None

    def do(self, actions: Sequence[Action]) -> None:
        """Carry out actions (outside the lock) with their registered handlers."""
        for a in actions:
            if isinstance(a, Mark):
                with self.cond:
                    rest = self.mark([a])
                self.do(rest)
            else:
                self.handlers[type(a)](a)

    # ----------------------------------------------------------- observations
    def gate(self) -> float:
        """How far (exclusive) this node may bring stripes in: slowest consumer + window."""
        if self.window is None:
            return float("inf")
        low = self.replica.ranks.slowest(grace_s=self.timeout_s)
        return float("inf") if low is None else low + self.window

    def holder_alive(self, local_rank: int) -> bool:
        """Whether a local rank runs and is waited for."""
        return self.replica.ranks.rank_alive(local_rank, grace_s=self.timeout_s)

    # ------------------------------------------------------------------ notes
    def note(self, what: Tally | None) -> None:
        """Something moved: for the timeline, the peak and the no-progress check."""
        now = time.monotonic()
        grew = what in (Tally.READ, Tally.RECEIVED, Tally.FALLBACK)
        held = self.replica.allocated_bytes() if grew else 0
        with self.cond:
            self.last_progress = now
            if what is not None:
                self.timeline[what.value] = now - self.t0
            self.peak = max(self.peak, held)
            self.cond.notify_all()

    def fail(self, message: str) -> None:
        """Record a problem for the report and the log."""
        with self.cond:
            self.failures.append(message)
        log.warning("cluster mode: %s", message)

    def spawn(
        self, fn: Callable[[], None], name: str, on_crash: Callable[[], Any] | None = None
    ) -> threading.Thread:
        """Start a daemon thread whose failure lands in the report (then `on_crash()`)."""

        def run() -> None:
            try:
                fn()
            except Exception as exc:  # every background failure lands in the report
                self.fail(f"{name} crashed: {exc!r}")
                if on_crash is not None:
                    on_crash()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t
