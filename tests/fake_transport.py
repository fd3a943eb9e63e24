"""An in-process `Transport` for tests of the exchange without processes or sockets.

Ranks are threads of one process; a send is buffered (its bytes are copied when it is
posted) and a receive takes them when both sides are there. A rank can be cut off
(`Switchboard.cut`): transfers to or from it fail at once, as gloo's do on a closed pair.
"""

from __future__ import annotations

import threading
from typing import Any

from loader_adapter.cluster.plan import Op, OpKind
from loader_adapter.cluster.transport import TransferError


class Switchboard:
    """The messages in flight between the ranks of one simulated job."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: dict[tuple[int, int, int], bytes] = {}
        self._cut: set[int] = set()
        self.delivered = 0

    def cut(self, rank: int) -> None:
        """Rank `rank` is gone: every transfer with it fails."""
        with self._cond:
            self._cut.add(rank)
            self._cond.notify_all()

    def transport(self, rank: int) -> FakeTransport:
        """Rank `rank`'s end of the switchboard."""
        return FakeTransport(self, rank)


class FakeTransport:
    """One rank's `loader_adapter.cluster.transport.Transport` on a `Switchboard`."""

    def __init__(self, board: Switchboard, rank: int) -> None:
        self.board = board
        self.rank = rank

    def _closed(self, peer: int) -> bool:
        return peer in self.board._cut or self.rank in self.board._cut

    def start(self, op: Op, buffer: memoryview) -> Any:
        b = self.board
        with b._cond:
            if self._closed(op.peer):
                raise TransferError(f"connection to rank {op.peer} closed")
            if op.kind is OpKind.SEND:
                b._messages[(self.rank, op.peer, op.stripe)] = bytes(buffer)
                b._cond.notify_all()
        return op, buffer

    def wait(self, handle: Any, timeout_s: float) -> None:
        op, buffer = handle
        if op.kind is OpKind.SEND:
            return
        b, key = self.board, (op.peer, self.rank, op.stripe)
        with b._cond:
            if not b._cond.wait_for(lambda: key in b._messages or self._closed(op.peer), timeout_s):
                raise TransferError(f"receive of stripe {op.stripe} timed out")
            if key not in b._messages:
                raise TransferError(f"connection to rank {op.peer} closed")
            buffer[:] = b._messages.pop(key)
            b.delivered += len(buffer)

    def abandon(self, handle: Any) -> None:
        pass
