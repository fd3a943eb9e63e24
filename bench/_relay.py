"""A TCP relay that delays every byte by a fixed time (see :mod:`bench.sshfs`).

This kernel has no ``netem`` qdisc, so the link's latency is added here: the relay runs
in the server's network namespace, accepts on the namespace's veth address and forwards to
sshd on the namespace's loopback. Each direction of a connection is a delay line whose
buffer is a pipe: bytes move socket -> pipe -> socket with ``splice(2)`` and are never
copied into this process, which only keeps ``(due time, byte count)`` per read. One
thread runs every connection with ``select`` (microsecond timeouts; ``epoll`` rounds to
milliseconds). Throughput is not limited here (``tc tbf`` on the veth does that); a
direction holds at most one pipe of bytes (1 MiB where allowed) before it stops reading,
so TCP back-pressure still reaches the sender.

Run as ``python _relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_S``. It
prints ``ready`` on stdout once it listens, and ends when stdin closes (the parent is
gone) or on SIGTERM. ``SIGSTOP`` freezes the link (no byte moves either way) until
``SIGCONT``. It imports only the standard library: it is started by path inside the
namespace.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import select
import socket
import sys
import time
from typing import Any

_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20
_NONBLOCK = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


class DelayLine:
    """One direction of a connection: ``src`` -> pipe -> ``dst``, ``delay_s`` late."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        self.src, self.dst, self.delay_s = src, dst, delay_s
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:
            self.capacity = 1 << 16
        self.due: collections.deque[list[float]] = collections.deque()  # [due, bytes]
        self.queued = 0
        self.src_eof = False
        self.pipe_full = False  # every pipe slot holds a (partial) page: drain first
        self.blocked = False  # dst refused bytes: wait until it is writable
        self.done = False

    def wants_read(self) -> bool:
        return not self.src_eof and not self.pipe_full and self.queued < self.capacity

    def on_readable(self, now: float) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, self.capacity - self.queued,
                          flags=_NONBLOCK)  # fmt: skip
        except BlockingIOError:  # the socket had nothing after all, or the pipe is full
            self.pipe_full = self.queued > 0
            return
        except OSError:
            n = 0
        if n == 0:
            self.src_eof = True
        else:
            self.due.append([now + self.delay_s, n])
            self.queued += n

    def next_due(self) -> float | None:
        return self.due[0][0] if self.due and not self.blocked else None

    def flush(self, now: float) -> None:
        """Send every block that is due; note when ``dst`` is full."""
        self.blocked = False
        while self.due and self.due[0][0] <= now:
            head = self.due[0]
            try:
                n = os.splice(self.pipe_r, self.dst.fileno(), int(head[1]), flags=_NONBLOCK)
            except OSError as exc:
                if exc.errno in _AGAIN:
                    self.blocked = True
                    return
                raise
            head[1] -= n
            self.queued -= n
            self.pipe_full = False
            if head[1] <= 0:
                self.due.popleft()
        if self.src_eof and not self.due and not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Connection:
    """A client and its upstream socket, with one delay line each way."""

    def __init__(self, client: socket.socket, upstream: socket.socket, delay_s: float) -> None:
        self.socks = (client, upstream)
        for sock in self.socks:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lines = (DelayLine(client, upstream, delay_s), DelayLine(upstream, client, delay_s))

    @property
    def finished(self) -> bool:
        return all(line.done for line in self.lines)

    def close(self) -> None:
        for line in self.lines:
            line.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


def serve(listener: socket.socket, target: tuple[str, int], delay_s: float) -> None:
    """Relay every accepted connection until stdin closes.

    While bytes flow, rounds are at least ``gap`` apart, so that each splice moves what
    arrived meanwhile instead of one TCP segment per wake-up; a block is then sent at
    most ``gap`` later than due.
    """
    conns: list[Connection] = []
    listener.setblocking(False)
    gap = min(delay_s / 4, 0.0002)
    last_round = 0.0
    while True:
        lines = [line for c in conns for line in c.lines]
        readers: list[Any] = [0, listener, *(ln.src for ln in lines if ln.wants_read())]
        writers = [ln.dst for ln in lines if ln.blocked]
        due = [d for ln in lines if (d := ln.next_due()) is not None]
        now = time.monotonic()
        if lines and now - last_round < gap:
            time.sleep(gap - (now - last_round))
            now = time.monotonic()
        timeout = max(0.0, min(due) - now) if due else None
        readable, _writable, _ = select.select(readers, writers, [], timeout)
        now = last_round = time.monotonic()
        if 0 in readable and not os.read(0, 4096):
            return
        if listener in readable:
            _accept(listener, target, delay_s, conns)
        for c in list(conns):
            try:
                for line in c.lines:
                    if line.src in readable and line.wants_read():
                        line.on_readable(now)
                    line.flush(now)
            except OSError:
                c.close()  # a peer is gone: both ends see the close
                conns.remove(c)
                continue
            if c.finished:
                c.close()
                conns.remove(c)


def _accept(
    listener: socket.socket, target: tuple[str, int], delay_s: float, conns: list[Connection]
) -> None:
    try:
        client, _addr = listener.accept()
    except BlockingIOError:
        return
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    conns.append(Connection(client, upstream, delay_s))


def _prefer_cpu() -> None:
    """Run as a real-time thread where allowed: the wire does not wait for the node's
    CPUs, and a relay that waits milliseconds for a busy core adds that to the latency.
    It uses little CPU, and the kernel caps real-time tasks at 95% of a core anyway."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    """Listen, then relay through delay lines until stdin closes.

    Args:
        argv: ``[script, listen_host, listen_port, target_host, target_port, delay_s]``.

    Returns:
        0 when stdin closes; 2 on bad arguments.
    """
    if len(argv) != 6:
        sys.stderr.write(__doc__ or "")
        return 2
    listener = socket.create_server((argv[1], int(argv[2])), backlog=64)
    _prefer_cpu()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    serve(listener, (argv[3], int(argv[4])), float(argv[5]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
