"""A TCP relay that adds a round trip of latency to a connection (see :mod:`bench.sshfs`).

This kernel has no ``netem`` qdisc, so the link's latency is added here: the relay runs in
the server's network namespace, accepts on the namespace's veth address and forwards to
sshd on the namespace's loopback.

The whole round trip is added on the way in (client -> server): every byte a client sends
reaches sshd ``delay_s`` later. A request is answered one round trip later than without
the relay, which is what latency does to a request/response protocol such as SFTP (and to
ssh's window updates); the answers, which carry the bulk of the bytes, are forwarded at
once. Delaying only one direction keeps the relay cheap: the bulk direction is a blocking
``splice(2)`` loop in its own thread (socket -> pipe -> socket, never copied into this
process), and only the small client -> server traffic goes through the delay line, a pipe
plus a queue of ``(due time, byte count)`` served by one ``select`` loop (microsecond
timeouts; ``epoll`` rounds to milliseconds). Throughput is not limited here (``tc tbf`` on
the veth does that); the delay line holds at most one pipe of bytes (1 MiB where allowed)
before it stops reading, so TCP back-pressure still reaches the client.

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
import threading
import time
from typing import Any

_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20
_NONBLOCK = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def _pipe() -> tuple[int, int, int]:
    """A non-blocking pipe made as large as allowed: (read end, write end, capacity)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        capacity = fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:
        capacity = 1 << 16
    return r, w, capacity


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class DelayLine:
    """``src`` -> pipe -> ``dst``, each block ``delay_s`` after it arrived."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        self.src, self.dst, self.delay_s = src, dst, delay_s
        self.pipe_r, self.pipe_w, self.capacity = _pipe()
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
        _close_fds(self.pipe_r, self.pipe_w)


def _forward(src: socket.socket, dst: socket.socket, finished: threading.Event) -> None:
    """Move ``src`` -> ``dst`` at once until EOF, through a pipe (the answers' direction).

    The sockets are non-blocking (the select loop shares them), so each splice that
    would block waits in ``poll`` first.
    """
    pipe_r, pipe_w, capacity = _pipe()
    readable, writable = select.poll(), select.poll()
    readable.register(src, select.POLLIN)
    writable.register(dst, select.POLLOUT)
    try:
        while True:
            try:
                n = os.splice(src.fileno(), pipe_w, capacity, flags=_NONBLOCK)
            except BlockingIOError:
                readable.poll()
                continue
            if n == 0:
                break
            while n:
                try:
                    n -= os.splice(pipe_r, dst.fileno(), n, flags=_NONBLOCK)
                except BlockingIOError:
                    writable.poll()
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):  # a peer is gone: both ends see the close
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        _close_fds(pipe_r, pipe_w)
        finished.set()


class Connection:
    """A client and its upstream socket: a delay line in, a splice thread out."""

    def __init__(self, client: socket.socket, upstream: socket.socket, delay_s: float) -> None:
        self.socks = (client, upstream)
        for sock in self.socks:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbound = DelayLine(client, upstream, delay_s)
        self.outbound_done = threading.Event()
        threading.Thread(
            target=_forward, args=(upstream, client, self.outbound_done), daemon=True
        ).start()

    @property
    def finished(self) -> bool:
        return self.inbound.done and self.outbound_done.is_set()

    def close(self) -> None:
        self.inbound.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the outbound thread's poll
        self.outbound_done.wait(5)
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()


def serve(listener: socket.socket, target: tuple[str, int], delay_s: float) -> None:
    """Relay every accepted connection until stdin closes.

    While requests flow, rounds are at least ``gap`` apart, so that each splice moves what
    arrived meanwhile instead of one TCP segment per wake-up; a block is then sent at
    most ``gap`` later than due.
    """
    conns: list[Connection] = []
    listener.setblocking(False)
    gap = min(delay_s / 4, 0.0002)
    last_round = 0.0
    while True:
        lines = [c.inbound for c in conns]
        readers: list[Any] = [0, listener, *(ln.src for ln in lines if ln.wants_read())]
        writers = [ln.dst for ln in lines if ln.blocked]
        due = [d for ln in lines if (d := ln.next_due()) is not None]
        ending = any(ln.done for ln in lines)  # wait for the other direction's thread
        now = time.monotonic()
        if lines and now - last_round < gap:
            time.sleep(gap - (now - last_round))
            now = time.monotonic()
        timeout = max(0.0, min(due) - now) if due else None
        if ending:
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        readable, _writable, _ = select.select(readers, writers, [], timeout)
        now = last_round = time.monotonic()
        if 0 in readable and not os.read(0, 4096):
            return
        if listener in readable:
            _accept(listener, target, delay_s, conns)
        for c in list(conns):
            try:
                if c.inbound.src in readable and c.inbound.wants_read():
                    c.inbound.on_readable(now)
                c.inbound.flush(now)
            except OSError:
                c.close()
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
    """Run as a real-time task where allowed: the wire does not wait for the node's CPUs,
    and a relay that waits milliseconds for a busy core adds them to the latency. It uses
    little CPU, and the kernel caps real-time tasks at 95% of a core anyway."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    """Listen, then relay until stdin closes.

    Args:
        argv: ``[script, listen_host, listen_port, target_host, target_port, delay_s]``;
            ``delay_s`` is the round trip to add.

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
