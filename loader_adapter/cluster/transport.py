"""How stripes travel between ranks: a `Transport` protocol and its gloo implementation.

The exchange posts each operation of its schedule (`loader_adapter.cluster.plan.Op`) on
the stripe's bytes in the replica (no extra buffer) and waits for it with a timeout. Any
point-to-point transport that can do that fits: gloo over TCP here; NCCL or a
user-space RDMA library later. ``tests/fake_transport.py`` is an in-process one that can
lose peers, for tests of the exchange without processes.
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol

from loader_adapter.cluster.plan import Op, OpKind

__all__ = ["GlooTransport", "TransferError", "Transport"]

#: Transfers that timed out: gloo may still touch their memory, so it is never freed.
_ABANDONED: list[Any] = []


class TransferError(Exception):
    """A transfer could not start, failed or timed out: its peer is to be given up."""


class Transport(Protocol):
    """Point-to-point transfers between the ranks of one job.

    A message is matched by (sender, receiver, tag); the tag is the stripe's index.
    """

    def start(self, op: Op, buffer: memoryview) -> Any:
        """Post `op`: send `buffer` to ``op.peer`` or receive into it from ``op.peer``.

        Returns:
            A handle for `wait` or `abandon`.

        Raises:
            TransferError: it cannot start (the peer's connection is closed).
        """
        ...

    def wait(self, handle: Any, timeout_s: float) -> None:
        """Wait for a posted transfer to end.

        Raises:
            TransferError: it failed, or did not end within `timeout_s`.
        """
        ...

    def abandon(self, handle: Any) -> None:
        """Stop waiting for a transfer whose peer is given up; its buffer must stay valid
        (the transport may still write into it)."""
        ...


class GlooTransport:
    """`Transport` over a ``torch.distributed`` gloo group (TCP).

    Args:
        group: the gloo process group of the job's ranks.

    Example:
        >>> group = dist.new_group(backend="gloo")  # doctest: +SKIP
        >>> GlooTransport(group).start(Op(0, OpKind.SEND, 1), view)  # doctest: +SKIP
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    def start(self, op: Op, buffer: memoryview) -> Any:
        import torch
        import torch.distributed as dist

        tensor = torch.frombuffer(buffer, dtype=torch.uint8)  # no copy: gloo uses the bytes
        try:
            if op.kind is OpKind.SEND:
                work = dist.isend(tensor, dst=op.peer, group=self.group, tag=op.stripe)
            else:
                work = dist.irecv(tensor, src=op.peer, group=self.group, tag=op.stripe)
        except RuntimeError as exc:  # gloo: the pair is closed (the peer died)
            raise TransferError(str(exc)) from exc
        return work, tensor

    def wait(self, handle: Any, timeout_s: float) -> None:
        work, _ = handle
        try:
            work.wait(datetime.timedelta(seconds=timeout_s))
        except Exception as exc:  # gloo raises RuntimeError, and others on a torn pair
            raise TransferError(str(exc)) from exc

    def abandon(self, handle: Any) -> None:
        _ABANDONED.append(handle)
