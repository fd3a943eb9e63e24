"""The reader process: warms byte ranges of files into the page cache for its parent.

A read that a FUSE client daemon (sshfs, a network filesystem's FUSE client) has taken
cannot be interrupted: the thread sleeps uninterruptibly until the server answers, and a
process ends only when all its threads do. Done in the serving process, one such read
keeps it alive (a zombie) for as long as the server is gone. Done here, it keeps only this
small process alive; the page cache is the node's, so what this process warms serves the
parent's `mmap` just the same.

Run as a script (``python -I -S _reader_child.py THREADS``) with nothing but the
standard library, so it starts in milliseconds. Requests arrive on stdin, replies leave
on stdout, both as fixed binary records (`REQUEST`, `REPLY`); `engine.reader_process`
imports this module for the same records. End of stdin ends the process at once:
requests still queued are dropped, and a read still blocked ends the process when it
returns. The parent's death kills it too (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import signal
import struct
import sys
import threading

#: id, offset, length, read-ahead limit (0: none), flags, path length; the path follows.
REQUEST = struct.Struct("<qqqqiI")
#: id, bytes read into the cache, bytes found already cached, errno (0: success).
REPLY = struct.Struct("<qqqi")
#: Skip a range whose pages are all cached already.
FLAG_SKIP_CACHED = 1
#: sendfile moves at most this much per call, so that a cancel is seen between pieces.
PIECE_BYTES = 8 << 20
#: Files each reader thread keeps open between requests.
FILES_PER_THREAD = 8

_SYS_CACHESTAT = 451
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
#: The process's name in ``top``, ``ps -o comm`` and ``perf``: this process is a reader.
COMM = b"ckpt-reader"
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "wb", "ev", "rev")]


_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _all_cached(fd: int, size: int, offset: int, length: int) -> bool:
    start = offset - offset % _PAGE
    end = min(offset + length, size)
    if end <= offset:
        return True
    rng, out = _Range(start, end - start), _Stat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
        return False  # no cachestat here: read, a cached page costs little
    return out.cache >= -(-(end - start) // _PAGE)


_DEFAULT_READ_AHEAD = 128 << 10
#: Read-ahead windows before a limit that are read without read-ahead: the windows of the
#: sequential part run up to two ahead, and a page they marked, when read, starts one more.
_TAIL_WINDOWS = 4
_read_ahead: dict[int, int] = {}
#: The smallest read-ahead window worth one ``WILLNEED`` call per window (`_warm`).
MIN_ASK_BYTES = 64 << 10
#: Read-ahead windows a read keeps asked ahead of its sendfile (`_warm`): 8 times what a
#: stream of plain reads keeps in flight (two windows), and a whole 16 MiB read on a
#: mount with a 1 MiB read-ahead.
ASK_WINDOWS = 16


def _read_ahead_bytes(fd: int) -> int:
    """The read-ahead of the device holding `fd` (``/sys/class/bdi/MAJ:MIN``), cached."""
    dev = os.fstat(fd).st_dev
    if dev not in _read_ahead:
        try:
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
                _read_ahead[dev] = int(f.read()) << 10
        except (OSError, ValueError):
            _read_ahead[dev] = _DEFAULT_READ_AHEAD
    return _read_ahead[dev]


def ask(fd: int, offset: int, length: int, window: int) -> None:
    """Ask the kernel for [offset, offset + length) at once, one read-ahead window a call.

    ``WILLNEED`` submits the reads of one window without waiting for them (the kernel
    takes at most one window per call, whatever the length given). Shared with the
    readers that run in the serving process (cluster mode's `StripeReader`): this file
    must run on the standard library alone, so the ask lives here.
    """
    end = offset + length
    for at in range(offset, end, window):
        os.posix_fadvise(fd, at, min(window, end - at), os.POSIX_FADV_WILLNEED)


def _warm(null: int, fd: int, offset: int, length: int) -> int:
    """Read [offset, offset + length) into the page cache, `ASK_WINDOWS` windows deep.

    One stream of plain reads keeps about one read-ahead window in flight, so on a link
    with a long round trip a stream is slow however wide the link (the many-streams
    profile: 16 MiB in 1.6-1.8 s at 2 requests in flight; asked at once, 0.18 s at 17).
    So the range is asked for ahead of the sendfile (`ask`), up to `ASK_WINDOWS` windows
    past it. Deeper is not better: where the storage's bandwidth, not its round trip, is
    the limit, more asked reads only queue, likely with the loader's own requests (opens,
    headers, a fault) behind them (the whole range asked at once cost 3-10% on slow-nfs
    with 64 small files). The asked pages carry no read-ahead mark, so nothing past the range
    is read. Where read-ahead is (nearly) off, nothing is asked.
    """
    window = _read_ahead_bytes(fd)
    depth = ASK_WINDOWS * window if window >= MIN_ASK_BYTES else 0
    # sendfile pieces of half the depth: the asks stay between one half and a whole depth ahead
    piece = min(PIECE_BYTES, max(window, depth // 2)) if depth else PIECE_BYTES
    end = offset + length
    asked = offset
    done = 0
    while done < length:
        want = min(length - done, piece)
        if depth and asked < end:
            upto = min(end, offset + done + depth)
            if upto > asked:
                ask(fd, asked, upto - asked, window)
                asked = upto
        try:
            n = os.sendfile(null, fd, offset + done, want)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            n = len(os.pread(fd, want, offset + done))  # this filesystem cannot splice
        if n == 0:
            break
        done += n
    return done


def _warm_limited(null: int, fd: int, offset: int, length: int, limit: int) -> int:
    """Warm [offset, offset + length) without the kernel reading ahead past `limit`.

    Sequential reads make the kernel read ahead, up to a window of the device's read-ahead
    beyond the last byte asked for: past the end of a run of experts that only other nodes
    load, that reads bytes nobody here needs (measured on a FUSE mount with a 1 MiB
    read-ahead and 1 MiB experts: about the whole checkpoint instead of half). The range
    is asked for exactly (`_warm`), and what lies within a few windows of `limit` is read
    with read-ahead off (``POSIX_FADV_RANDOM`` on this thread's own descriptor), so that a
    page the ask did not bring (memory was short) is read alone, not with a window past
    the limit; then read-ahead is back on.
    """
    end = offset + length
    zone = max(offset, limit - _TAIL_WINDOWS * max(4096, _read_ahead_bytes(fd)))
    if zone >= end:
        return _warm(null, fd, offset, length)
    done = _warm(null, fd, offset, zone - offset)
    if done < zone - offset:
        return done  # end of file
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        return done + _warm(null, fd, zone, end - zone)
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)


class _Files:
    """One thread's open files, least recently used closed first.

    On a network client an open and a close are each a round trip to the server (sshfs:
    an SFTP OPEN and CLOSE): opening once per file instead of once per range keeps a
    stream's link busy between its ranges. Per thread, so no descriptor is closed under
    another thread's read.
    """

    def __init__(self) -> None:
        self._open: dict[bytes, tuple[int, int]] = {}

    def get(self, path: bytes) -> tuple[int, int]:
        """(descriptor, size) of `path`, opened if needed."""
        entry = self._open.pop(path, None)
        if entry is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                entry = (fd, os.fstat(fd).st_size)
            except OSError:
                os.close(fd)
                raise
            while len(self._open) >= FILES_PER_THREAD:
                old = next(iter(self._open))
                os.close(self._open.pop(old)[0])
        self._open[path] = entry  # most recently used last
        return entry

    def drop(self, path: bytes) -> None:
        """Close `path` (after an error on it: the next range opens it afresh)."""
        entry = self._open.pop(path, None)
        if entry is not None:
            os.close(entry[0])


class _Threads:
    """Reader threads, started as requests need them, up to a limit.

    A thread that reads a file keeps it open (`_Files`), and the kernel keeps that open
    file's read-ahead state: few threads, each reading on, stay on warm descriptors. A
    fixed pool of the limit (the most streams the prefetch may adapt to, often 32 or
    more) handed each request to a different thread, which opened the file afresh and
    started read-ahead from its smallest window: on the real sshfs client that cost
    0.475 CPU-s/GB against 0.40 with one thread, at the same rate.
    """

    def __init__(self, limit: int, out: int, null: int) -> None:
        self._limit = max(1, limit)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._mu = threading.Lock()
        self._write = threading.Lock()
        self._idle = 0  # started threads neither reading nor promised a queued request
        self._started = 0
        self._out, self._null = out, null

    def put(self, job: tuple[int, bytes, int, int, int, int]) -> None:
        """Queue a request; start a thread unless an idle one is there to take it."""
        with self._mu:
            if self._idle:
                self._idle -= 1  # promised to this request
            elif self._started < self._limit:
                self._started += 1
                threading.Thread(
                    target=self._serve, name=f"reader-{self._started}", daemon=True
                ).start()
        self._jobs.put(job)

    def _take(self, done_one: bool) -> tuple[int, bytes, int, int, int, int]:
        """The next request for a thread (that just finished one, when `done_one`)."""
        if done_one:
            with self._mu:
                self._idle += 1
        return self._jobs.get()

    def _serve(self) -> None:
        files = _Files()
        done_one = False
        while True:
            job = self._take(done_one)
            done_one = True
            reply = _answer(files, self._null, *job)
            with self._write:
                os.write(self._out, reply)


def _answer(
    files: _Files,
    null: int,
    rid: int,
    path: bytes,
    offset: int,
    length: int,
    limit: int,
    flags: int,
) -> bytes:
    """Carry out one request; the reply record."""
    warmed = cached = code = 0
    try:
        fd, size = files.get(path)
        try:
            if flags & FLAG_SKIP_CACHED and _all_cached(fd, size, offset, length):
                cached = length
            elif limit:
                warmed = _warm_limited(null, fd, offset, length, limit)
            else:
                warmed = _warm(null, fd, offset, length)
        except OSError:
            files.drop(path)
            raise
    except OSError as exc:
        code = exc.errno or errno.EIO
    return REPLY.pack(rid, warmed, cached, code)


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str]) -> None:
    """Serve requests from stdin with up to `argv[1]` reader threads until stdin ends."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(COMM), 0, 0, 0)  # threads started later inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    if os.getppid() == 1:
        os._exit(0)  # the parent died before the death signal was armed
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    threads = _Threads(int(argv[1]), 1, null)
    while (head := _read_exact(0, REQUEST.size)) is not None:
        rid, offset, length, limit, flags, plen = REQUEST.unpack(head)
        path = _read_exact(0, plen)
        if path is None:
            break
        threads.put((rid, path, offset, length, limit, flags))
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
