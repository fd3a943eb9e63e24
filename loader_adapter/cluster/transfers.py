"""The transfer threads of one rank's exchange: a poster and a completer.

The poster starts the schedule's operations in order on the `Transport`, each on its
stripe's bytes in the replica (at most ``inflight`` at once, as the machine allows); the
completer waits for them in the same order, each with the exchange timeout, and tells the
machine how each ended. Waiting on another thread than posting lets a finished receive be
marked ready while posting waits for a gate: the loader may need it to move the window.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from loader_adapter.cluster.core import Core
from loader_adapter.cluster.machine import Post, Tally
from loader_adapter.cluster.plan import OpKind
from loader_adapter.cluster.transport import TransferError, Transport

__all__ = ["Transfers"]


class Transfers:
    """Posts and completes this rank's transfers (the machine's `Post` actions).

    Args:
        core: the exchange's shared core (its `Post` handler is set here).
        transport: how stripes travel.
        on_crash: called when either thread crashes (nothing more will be received).
        after_each: called after each transfer ended (freeing may go on).
    """

    def __init__(
        self,
        core: Core,
        transport: Transport,
        *,
        on_crash: Callable[[], None],
        after_each: Callable[[], None],
    ) -> None:
        self.core = core
        self._after_each = after_each
        self.transport = transport
        self.abandoned = False  # a transport may still write into the replica
        self._outstanding: collections.deque[tuple[Post, Any]] = collections.deque()
        self._posting_done = False
        core.handlers[Post] = self.post
        self.threads: list[threading.Thread] = [
            core.spawn(self._complete_loop, "ckpt-cluster-complete", on_crash),
            core.spawn(self._post_loop, "ckpt-cluster-exchange", on_crash),
        ]

    def post(self, a: Post) -> None:
        """Carry out a `Post`: start the transfer (or tell the machine it could not)."""
        core = self.core
        s = core.machine.plan.stripes[a.op.stripe]
        if a.discard:  # here already (read from storage meanwhile): receive and drop
            buffer = memoryview(bytearray(s.length))
        else:
            if a.op.kind is OpKind.RECV:  # ENOSPC here, not a SIGBUS when gloo writes
                core.replica.allocate(s.file, s.offset, s.length)
            buffer = core.replica.view(s.file, s.offset, s.length)
        try:
            handle = self.transport.start(a.op, buffer)
        except TransferError as exc:
            core.step(core.machine.post_failed, a.op, str(exc))
            return
        with core.cond:
            self._outstanding.append((a, handle))
            core.cond.notify_all()

    def _post_loop(self) -> None:
        core, m = self.core, self.core.machine
        try:
            while (
                actions := core.decide(
                    lambda: m.next_post(core.gate(), core.replica.state),
                    lambda: m.posting_done,
                )
            ) is not None:
                core.do(actions)
        finally:
            with core.cond:
                self._posting_done = True
                core.cond.notify_all()

    def _complete_loop(self) -> None:
        core = self.core
        while True:
            with core.cond:
                while not self._outstanding and not self._posting_done:
                    if core.cancelled.is_set():
                        return
                    core.cond.wait(0.1)
                if not self._outstanding:
                    return
                post, handle = self._outstanding[0]
                given_up = post.op.peer in core.machine.failed_peers
            if core.cancelled.is_set():
                with core.cond:
                    for _, h in self._outstanding:
                        self.transport.abandon(h)
                    self.abandoned = True
                return
            self._complete(post, handle, given_up)
            with core.cond:
                self._outstanding.popleft()
                core.cond.notify_all()
            self._after_each()

    def _complete(self, post: Post, handle: Any, given_up: bool) -> None:
        core, op = self.core, post.op
        error = None
        if not given_up:
            try:
                self.transport.wait(handle, core.timeout_s)
            except TransferError as exc:
                error, given_up = str(exc), True
        if given_up:  # the transport may still write into the buffer: keep it
            self.transport.abandon(handle)
            self.abandoned = True
        core.step(core.machine.transfer_ended, op, discard=post.discard, error=error)
        if error is None and op.peer not in core.machine.failed_peers:
            core.note(Tally.SENT if op.kind is OpKind.SEND else Tally.RECEIVED)
