"""Counting wrapper around OpenSSH's ``sftp-server`` (see :mod:`bench.sshfs`).

sshd starts this file as its ``sftp`` subsystem (``python _sftp_counter.py COUNTER_DIR
DELAY_S SFTP_SERVER [ARGS]``). It starts the real ``sftp-server`` on a pair of pipes and
passes every byte through unchanged, reading the SFTP v3 framing on the way:

* client -> server: ``OPEN`` (id -> path), ``READ`` (id -> handle, length) and ``CLOSE``
  requests are noted *before* the bytes are forwarded, so an answer can never arrive
  for a request not yet seen;
* server -> client: each ``DATA`` answer adds its payload length to ``bytes_served``;
  the payload itself moves with ``splice(2)`` from pipe to pipe and is never copied into
  this process. ``STATUS`` answers to reads count as EOF or error, ``HANDLE`` answers to
  opens as opens.

With ``DELAY_S`` > 0 every request reaches the sftp-server that much after it arrived (a
writer thread, real-time where allowed, releases them in order): the round trip of a
link with latency, as SFTP sees it, at no cost per byte of data (see :mod:`bench.sshfs`).

The counters are little-endian int64 slots in a small file (``COUNTER_DIR/<pid>.ctr``)
that the mounting process maps and reads; each slot has one writer thread. Slot 0 is
written last at start, so a reader ignores a file that is not yet initialised.

It imports nothing from the ``bench`` package and only the standard library: it is started
by path, inside the network namespace, by sshd.
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
import subprocess
import sys
import threading
import time

MAGIC = 0x53465450_43545231  # "SFTPCTR1"
SLOTS = 16
# slot numbers (also read by bench/sshfs.py)
S_MAGIC, S_SERVER_PID, S_READS_SENT, S_OPENS_SENT = 0, 1, 2, 3
S_BYTES, S_DATA, S_EOF, S_ERRORS, S_OPENS_OK, S_MAX_DATA, S_DONE, S_DESYNC = range(4, 12)

_OPEN, _CLOSE, _READ = 3, 4, 5
_STATUS, _HANDLE, _DATA = 101, 102, 103
_FX_EOF = 1
_CHUNK = 1 << 16


def _read_exact(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``, or fewer only at end of file."""
    parts = []
    while n:
        block = os.read(fd, n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Splicer:
    """Moves ``n`` bytes between pipes with splice(2), or by copying where it fails."""

    def __init__(self) -> None:
        self.works = hasattr(os, "splice")

    def move(self, src: int, dst: int, n: int) -> int:
        moved = 0
        while moved < n:
            if self.works:
                try:
                    step = os.splice(src, dst, n - moved)
                except OSError:
                    self.works = False
                    continue
            else:
                block = os.read(src, min(n - moved, 1 << 18))
                _write_all(dst, block)
                step = len(block)
            if step == 0:
                break
            moved += step
        return moved


class Counters:
    """The mapped counter file; each slot is written by one thread only."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, f"{os.getpid()}.ctr")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, 8 * SLOTS)
        self._map = mmap.mmap(fd, 8 * SLOTS)
        os.close(fd)
        self.values = [0] * SLOTS

    def set(self, slot: int, value: int) -> None:
        self.values[slot] = value
        struct.pack_into("<q", self._map, 8 * slot, value)

    def add(self, slot: int, value: int = 1) -> None:
        self.set(slot, self.values[slot] + value)


class DelayedWriter:
    """Writes each block to ``fd`` ``delay_s`` after :meth:`put`, in order, from a thread."""

    def __init__(self, fd: int, delay_s: float) -> None:
        self.fd, self.delay_s = fd, delay_s
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, block: bytes) -> None:
        with self.cond:
            self.queue.append((time.monotonic() + self.delay_s, block))
            self.cond.notify()

    def close(self) -> None:
        """Write what is queued (when due), then close ``fd``."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        try:  # a late wake-up for a busy core would add to the latency: ask for real time
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # this thread only
        except (OSError, AttributeError):
            pass
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if not self.queue:
                        break
                    due, block = self.queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                _write_all(self.fd, block)
        except OSError:
            pass
        finally:
            os.close(self.fd)


class Wrapper:
    """The state shared by the two pump threads."""

    def __init__(
        self, counters: Counters, server_in: int, server_out: int, delay_s: float = 0.0
    ) -> None:
        self.ctr = counters
        self.server_in, self.server_out = server_in, server_out
        self.delay = DelayedWriter(server_in, delay_s) if delay_s > 0 else None
        self.open_ids: dict[int, str] = {}
        self.read_ids: set[int] = set()

    # --------------------------------------------------------- client -> server
    def _note_request(self, packet: memoryview) -> None:
        kind = packet[0]
        if kind not in (_OPEN, _READ) or len(packet) < 9:
            return
        (rid,) = struct.unpack_from(">I", packet, 1)
        if kind == _READ:
            self.read_ids.add(rid)
            self.ctr.add(S_READS_SENT)
        else:
            (n,) = struct.unpack_from(">I", packet, 5)
            self.open_ids[rid] = bytes(packet[9 : 9 + n]).decode("utf-8", "replace")
            self.ctr.add(S_OPENS_SENT)

    def pump_requests(self) -> None:
        """stdin -> sftp-server: note each complete request, then forward the bytes (late,
        with a delay)."""
        pending = bytearray()
        try:
            while True:
                block = os.read(0, _CHUNK)
                if not block:
                    break
                pending += block
                pos = 0
                while len(pending) - pos >= 4:
                    (length,) = struct.unpack_from(">I", pending, pos)
                    if len(pending) - pos - 4 < length:
                        break
                    self._note_request(memoryview(pending)[pos + 4 : pos + 4 + length])
                    pos += 4 + length
                del pending[:pos]
                if self.delay is not None:
                    self.delay.put(block)
                else:
                    _write_all(self.server_in, block)
        except OSError:
            pass
        finally:
            if self.delay is not None:
                self.delay.close()
            else:
                os.close(self.server_in)

    # --------------------------------------------------------- server -> client
    def _note_reply(self, kind: int, rid: int, body: bytes) -> None:
        if kind == _HANDLE and self.open_ids.pop(rid, None) is not None:
            self.ctr.add(S_OPENS_OK)
        elif kind == _STATUS:
            self.open_ids.pop(rid, None)
            if rid in self.read_ids:
                self.read_ids.discard(rid)
                code = struct.unpack_from(">I", body)[0] if len(body) >= 4 else -1
                self.ctr.add(S_EOF if code == _FX_EOF else S_ERRORS)

    def pump_replies(self, splicer: _Splicer) -> None:
        """sftp-server -> stdout: count DATA payloads (spliced), forward everything."""
        src, dst = self.server_out, 1
        while True:
            head = _read_exact(src, 9)  # length, type, request id (or version)
            if len(head) < 9:
                _write_all(dst, head)
                return
            length, kind, rid = struct.unpack(">IBI", head)
            if length < 5:  # not SFTP framing: stop counting, keep passing bytes through
                self.ctr.set(S_DESYNC, 1)
                _write_all(dst, head)
                while splicer.move(src, dst, 1 << 20):
                    pass
                return
            if kind == _DATA and length >= 9:
                size_raw = _read_exact(src, 4)
                _write_all(dst, head + size_raw)
                (size,) = struct.unpack(">I", size_raw)
                moved = splicer.move(src, dst, length - 9)
                if rid in self.read_ids:
                    self.read_ids.discard(rid)
                    self.ctr.add(S_BYTES, min(size, moved))
                    self.ctr.add(S_DATA)
                    if size > self.ctr.values[S_MAX_DATA]:
                        self.ctr.set(S_MAX_DATA, size)
                if moved < length - 9:
                    return
                continue
            body = _read_exact(src, length - 5)
            self._note_reply(kind, rid, body)
            _write_all(dst, head + body)
            if len(body) < length - 5:
                return


def main(argv: list[str]) -> int:
    """Run the real sftp-server ``argv[3:]`` behind the counting pumps.

    Args:
        argv: ``[script, counter_dir, delay_s, sftp_server, *server_args]``.

    Returns:
        The sftp-server's exit status.
    """
    counters = Counters(argv[1])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    server = subprocess.Popen(argv[3:], stdin=in_r, stdout=out_w)
    os.close(in_r)
    os.close(out_w)
    counters.set(S_SERVER_PID, server.pid)
    counters.set(S_MAGIC, MAGIC)
    wrapper = Wrapper(counters, in_w, out_r, float(argv[2]))
    requests = threading.Thread(target=wrapper.pump_requests, daemon=True)
    requests.start()
    try:
        wrapper.pump_replies(_Splicer())
    except OSError:
        pass
    finally:
        os.close(1)
    rc = server.wait()
    counters.set(S_DONE, 1)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
