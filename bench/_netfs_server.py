"""Server process of the simulated network filesystem (see :mod:`bench.netfs`).

This module runs as its own process (``python -m bench._netfs_server CONFIG_JSON``) so
that a stalled or blocked FUSE server can never deadlock the reads of the process that
mounted it. Of the bench it imports only `bench.protocol`, whose control messages it
answers, and `bench.bandwidth` (both standard library only).

The filesystem serves ``backing_dir`` read-only through a mount that keeps the kernel page
cache across opens, as NFS does (``keep_cache`` on every open, ``auto_cache`` off, large
attribute and entry timeouts). Every read is counted, delayed by a per-request latency,
paced by a bandwidth limit (`bench.bandwidth`: this server's own, or one shared with other
servers through a file), and can be failed or stalled on demand. A control thread
answers requests on a Unix socket, also while reads block: one handler per request type,
looked up in `HANDLERS`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import protocol as proto
from bench.bandwidth import LocalLink, SharedLink

log = logging.getLogger("netfs.server")

_FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _rel(path: str) -> str:
    """FUSE path ("/a/b") -> relative path ("a/b"); the root is ""."""
    return path.lstrip("/")


class ServerState:
    """Faults, throttles and counters, shared by every FUSE thread and the control thread.

    Args:
        link: The bandwidth limit the reads draw from (this server's or a shared one).
        latency_s: Seconds added to each read request.
    """

    def __init__(self, link: LocalLink | SharedLink, latency_s: float) -> None:
        self.cond = threading.Condition()
        self.link = link
        self.latency_s = float(latency_s)
        self.stall_until: float | None = None  # monotonic deadline; math.inf = until unstall
        self.eio: dict[str, list[tuple[int, int]]] = {}
        self.vanished: set[str] = set()
        self.shutting_down = False
        self.inflight = 0  # read requests in the server now
        self.stalled = 0  # read requests held by a stall now
        self.reset_counters()

    # ----------------------------------------------------------------- counters
    def reset_counters(self) -> None:
        with self.cond:
            self.bytes_served = 0
            self.requests = 0
            self.errors = 0
            self.opens = 0
            self.max_request_bytes = 0
            self.max_inflight = 0
            self.per_file: dict[str, list[int]] = {}

    def snapshot(self) -> dict[str, Any]:
        with self.cond:
            return {
                "bytes_served": self.bytes_served,
                "requests": self.requests,
                "errors": self.errors,
                "opens": self.opens,
                "max_request_bytes": self.max_request_bytes,
                "max_inflight": self.max_inflight,
                "inflight": self.inflight,
                "stalled": self.stalled,
                "per_file": {k: list(v) for k, v in self.per_file.items()},
            }

    def account(self, rel: str, nbytes: int) -> None:
        with self.cond:
            self.bytes_served += nbytes
            self.requests += 1
            self.max_request_bytes = max(self.max_request_bytes, nbytes)
            entry = self.per_file.setdefault(rel, [0, 0])
            entry[0] += nbytes
            entry[1] += 1

    def count_error(self) -> None:
        with self.cond:
            self.errors += 1

    def count_open(self) -> None:
        with self.cond:
            self.opens += 1

    # ------------------------------------------------------------------- faults
    def is_vanished(self, rel: str) -> bool:
        with self.cond:
            return rel in self.vanished

    def overlaps_eio(self, rel: str, offset: int, size: int) -> bool:
        with self.cond:
            ranges = self.eio.get(rel)
            if not ranges:
                return False
            end = offset + size
            return any(start < end and offset < stop for start, stop in ranges)

    def inject_eio(self, rel: str, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise ValueError("offset must be >= 0 and length > 0")
        with self.cond:
            self.eio.setdefault(rel, []).append((offset, offset + length))

    def vanish(self, rel: str) -> None:
        with self.cond:
            self.vanished.add(rel)

    @property
    def bandwidth_bps(self) -> float | None:
        return self.link.bps

    def set_bandwidth(self, bps: float | None) -> None:
        self.link.set_bps(bps)  # a shared link: for every server that draws from it

    def set_latency(self, seconds: float) -> None:
        with self.cond:
            self.latency_s = float(seconds)

    def stall(self, seconds: float | None) -> None:
        with self.cond:
            self.stall_until = math.inf if seconds is None else time.monotonic() + float(seconds)
            self.cond.notify_all()

    def unstall(self) -> None:
        with self.cond:
            self.stall_until = None
            self.cond.notify_all()

    def clear_faults(self) -> None:
        with self.cond:
            self.eio.clear()
            self.vanished.clear()
            self.stall_until = None
            self.cond.notify_all()

    def shutdown(self) -> None:
        with self.cond:
            self.shutting_down = True
            self.stall_until = None
            self.cond.notify_all()

    def wait_while_stalled(self) -> None:
        """Block the calling FUSE thread while a stall is in force."""
        with self.cond:
            if self.stall_until is None:
                return
            self.stalled += 1
            try:
                while not self.shutting_down and self.stall_until is not None:
                    remaining = self.stall_until - time.monotonic()
                    if remaining <= 0:
                        self.stall_until = None
                        self.cond.notify_all()
                        break
                    self.cond.wait(min(remaining, 0.5))
            finally:
                self.stalled -= 1

    # ----------------------------------------------------------------- throttle
    def enter(self) -> None:
        with self.cond:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def leave(self) -> None:
        with self.cond:
            self.inflight -= 1

    def pace(self, nbytes: int, arrival: float) -> None:
        """Sleep until a request of ``nbytes`` that arrived at ``arrival`` is delivered.

        Latency is added to each request independently (requests in flight overlap);
        bandwidth is one link shared by all threads (and by other servers, when shared):
        each request reserves the next ``nbytes / bandwidth`` seconds of it, no earlier
        than its arrival plus latency.
        """
        with self.cond:
            ready = arrival + self.latency_s
        delay = self.link.reserve(nbytes, ready) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _NetOps:
    """The filesystem's operations; `_make_ops` mixes them into mfusepy's Operations.

    mfusepy is imported only in the server process, so the base class is added there.
    """

    use_ns = True

    def __init__(self, mfusepy: Any, backing: str, state: ServerState, limits: dict[str, int]):
        self.error = mfusepy.FuseOSError
        self.state = state
        self.limits = limits  # max_read, max_background, congestion_threshold
        self.root = os.path.realpath(backing)
        self.fd_rel: dict[int, str] = {}
        self.fd_lock = threading.Lock()

    def _full(self, path: str) -> str:
        return os.path.join(self.root, _rel(path))

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.kernel_cache = 1
            config.auto_cache = 0
            config.entry_timeout = 86400.0
            config.attr_timeout = 86400.0
            config.negative_timeout = 0.0
        if conn is not None:
            # libfuse insists that init() repeats the max_read mount option.
            conn.max_read = self.limits["max_read"]
            conn.max_background = self.limits["max_background"]
            conn.congestion_threshold = self.limits["congestion_threshold"]
            # The backing files never change: no invalidation on attribute refresh.
            conn.want &= ~_FUSE_CAP_AUTO_INVAL_DATA
            log.info(
                "init: max_read=%d max_readahead=%d max_background=%d congestion=%d",
                conn.max_read,
                conn.max_readahead,
                conn.max_background,
                conn.congestion_threshold,
            )

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        rel = _rel(path)
        if rel and self.state.is_vanished(rel):
            raise self.error(errno.ENOENT)
        st = os.lstat(self._full(path))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        prefix = _rel(path)
        visible = [
            name
            for name in os.listdir(self._full(path))
            if not self.state.is_vanished(f"{prefix}/{name}".lstrip("/"))
        ]
        return [".", "..", *visible]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._full(path))
        return {
            key: getattr(sv, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_namemax",
            )
        }

    def open(self, path: str, fi: Any) -> int:
        rel = _rel(path)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise self.error(errno.EROFS)
        if self.state.is_vanished(rel):
            raise self.error(errno.ENOENT)
        fd = os.open(self._full(path), os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.error(errno.EISDIR)
        with self.fd_lock:
            self.fd_rel[fd] = rel
        fi.fh = fd
        fi.keep_cache = 1  # keep the page cache across opens, as NFS does
        fi.direct_io = 0
        self.state.count_open()
        return 0

    def release(self, path: str, fi: Any) -> int:
        fd = fi.fh
        with self.fd_lock:
            self.fd_rel.pop(fd, None)
        os.close(fd)
        return 0

    def read_into(self, fd: int, addr: int, size: int, offset: int) -> int:
        """Serve one read request straight into libfuse's reply buffer."""
        arrival = time.monotonic()
        rel = self.fd_rel.get(fd, "?")
        self.state.wait_while_stalled()
        self.state.enter()
        try:
            if self.state.is_vanished(rel) or self.state.overlaps_eio(rel, offset, size):
                self.state.pace(0, arrival)
                self.state.count_error()
                raise self.error(errno.EIO)
            if size == 0:
                return 0
            reply = (ctypes.c_char * size).from_address(addr)
            nbytes = os.preadv(fd, [reply], offset)
            self.state.pace(nbytes, arrival)
            self.state.account(rel, nbytes)
            return nbytes
        finally:
            self.state.leave()

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        # Registers the read callback with libfuse; PreadvFUSE.read calls read_into
        # instead, so this copying path only runs under a plain mfusepy.FUSE.
        buf = ctypes.create_string_buffer(size)
        nbytes = self.read_into(fi.fh, ctypes.addressof(buf), size, offset)
        return buf.raw[:nbytes]

    def destroy(self, path: str) -> None:
        log.info("destroy")


def _make_ops(mfusepy: Any, backing: str, state: ServerState, limits: dict[str, int]) -> Any:
    """The Operations object: `_NetOps` on mfusepy's base class, imported late."""
    cls = type("NetOps", (_NetOps, mfusepy.Operations), {})
    return cls(mfusepy, backing, state, limits)


def _make_fuse_class(mfusepy: Any) -> Any:
    class PreadvFUSE(mfusepy.FUSE):  # type: ignore[misc, name-defined]
        """mfusepy's FUSE with a read that fills the reply buffer in place (no bytes copy)."""

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            addr = ctypes.cast(buf, ctypes.c_void_p).value
            return self.operations.read_into(fip.contents.fh, addr, size, offset)

    return PreadvFUSE


class ControlServer:
    """JSON-lines control channel on a Unix socket, served by daemon threads."""

    def __init__(self, sock_path: str, state: ServerState, parent_pid: int) -> None:
        self.state = state
        self.parent_pid = parent_pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        self.sock.bind(sock_path)
        self.sock.listen(8)
        self.sock.settimeout(0.5)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="netfs-control", daemon=True).start()

    def _accept_loop(self) -> None:
        # Signals go to the main thread only, where libfuse's handlers end the session loop.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        while True:
            if os.getppid() != self.parent_pid:
                log.warning("parent %d is gone: lifting stalls, exiting", self.parent_pid)
                self.state.shutdown()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                log.exception("control socket failed")
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="netfs-control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                try:
                    request = proto.decode_control(line)
                    reply = proto.reply_ok(HANDLERS[type(request)](self.state, request))
                except Exception as exc:  # reported to the client, never fatal here
                    reply = proto.reply_error(f"{type(exc).__name__}: {exc}")
                stream.write(reply)
                stream.flush()


#: What the server does for each control request; the result is the reply's payload.
HANDLERS: dict[type, Callable[[ServerState, Any], Any]] = {
    proto.Ping: lambda st, r: {"pid": os.getpid()},
    proto.GetCounters: lambda st, r: st.snapshot(),
    proto.ResetCounters: lambda st, r: st.reset_counters(),
    proto.InjectEIO: lambda st, r: st.inject_eio(r.path, int(r.offset), int(r.length)),
    proto.Vanish: lambda st, r: st.vanish(r.path),
    proto.Stall: lambda st, r: st.stall(r.seconds),
    proto.Unstall: lambda st, r: st.unstall(),
    proto.ClearFaults: lambda st, r: st.clear_faults(),
    proto.SetBandwidth: lambda st, r: st.set_bandwidth(r.bps),
    proto.SetLatency: lambda st, r: st.set_latency(r.seconds),
    proto.Shutdown: lambda st, r: st.shutdown(),
}


def main(argv: list[str]) -> int:
    """Mount and serve until unmounted or signalled.

    Args:
        argv: ``[prog, CONFIG_JSON]``, a `bench.protocol.ServerConfig`.

    Returns:
        The process exit status.
    """
    cfg = proto.ServerConfig.from_json(argv[1])
    logging.basicConfig(
        level=cfg.log_level,
        stream=sys.stderr,
        format="netfs-server[%(process)d] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mfusepy").setLevel(logging.WARNING)
    logging.getLogger("fuse").setLevel(logging.WARNING)
    if os.getppid() != cfg.parent_pid:
        log.error("parent already gone")
        return 1

    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy  # imported here only: the parent never needs it

    if cfg.bandwidth_file:
        link: LocalLink | SharedLink = SharedLink(cfg.bandwidth_file)
    else:
        link = LocalLink(cfg.bandwidth_bps)
    state = ServerState(link, cfg.latency_s)
    ControlServer(cfg.control, state, cfg.parent_pid).start()
    limits = {
        "max_read": cfg.max_read,
        "max_background": cfg.max_background,
        "congestion_threshold": cfg.congestion_threshold,
    }
    ops = _make_ops(mfusepy, cfg.backing, state, limits)
    options = _mount_options(cfg)
    log.info("mounting %s at %s with %s", cfg.backing, cfg.mountpoint, options)
    try:
        _make_fuse_class(mfusepy)(ops, cfg.mountpoint, raw_fi=True, **options)
    except RuntimeError as exc:
        if state.shutting_down:  # e.g. a lazily detached mount that libfuse cannot unmount
            log.info("fuse_main ended with %s during shutdown", exc)
            return 0
        log.error("fuse_main failed: %s", exc)
        return 2
    finally:
        state.shutdown()
    log.info("unmounted, exiting")
    return 0


def _mount_options(cfg: proto.ServerConfig) -> dict[str, Any]:
    """libfuse's options: read-only, page cache kept across opens as NFS does, threads."""
    options: dict[str, Any] = {
        "foreground": True,
        "ro": True,
        "allow_other": cfg.allow_other,
        "default_permissions": True,
        "fsname": cfg.fsname,
        "subtype": "netfs",
        "kernel_cache": True,
        "noauto_cache": True,
        "entry_timeout": 86400,
        "attr_timeout": 86400,
        "negative_timeout": 0,
        "max_read": cfg.max_read,
    }
    if cfg.threads <= 1:
        options["nothreads"] = True
    else:
        options["max_threads"] = cfg.threads
        options["max_idle_threads"] = cfg.threads
    return options


if __name__ == "__main__":
    sys.exit(main(sys.argv))
